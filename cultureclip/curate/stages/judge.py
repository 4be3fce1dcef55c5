"""The judge stage: a vision-language model scores every rendered image and checks it against its twin.

For each twin pair, each side, each rendered image of that side's captions, two structured requests
go to an OpenAI-compatible server (:mod:`cultureclip.curate.backends.chat`), the image first in both (so a
server with prefix caching encodes it once):

* **scores** — the paper's three 1-5 scores (authenticity, consistency with the concept, cultural
  fidelity) and a one-sentence reason; the prompt names the concept, its country, context and features;
* **twin check** — *blind*: only the image and the two concept names of the twin pair, in alphabetical
  order, and the question which one it shows. It is a separate request on purpose: asked in the same
  prompt that names the intended concept, the answer would be given away.

The answer schemas are closed (scores are the integers 1-5, the twin choice one of the two names), so
a malformed or out-of-range answer is retried and, if it persists, written to the errors file with
its reason; nothing is defaulted. The pass rule (:func:`passes`) is not applied here: the records keep
the raw scores, and export and the dataset card apply the rule from their config.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import deque
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate.backends.chat import (ChatAnswer, ChatClient, ChatConfig, LazyChatClient, effective_chat,
                                              image_part)
from cultureclip.curate.backends.render_batches import image_file
from cultureclip.curate.prompts import load as load_prompt
from cultureclip.curate.runner import Job, Outcome, StageReport, Store, fingerprint, run_stage, save_report, up_to_date
from cultureclip.curate.sanitize import bound
from cultureclip.curate.stages.judge_rule import DEFAULT_RULE, card_section, check_rule, passes  # noqa: F401 (API)
from cultureclip.curate.stages.judge_standin import SCORES_SCHEMA, TWIN_SCHEMA
from cultureclip.curate.stages.settings import Judge as JudgeSettings, typed

log = logging.getLogger(__name__)

STAGE = "judge"
RENDER_STAGE = "render"
PROMPTS = ("judge_scores", "judge_twin")  # prompt files (cultureclip/curate/prompts); their text is in every key
SIDES = {  # side -> (concept, country, context, features, captions) of the pair record, and the other side
    schema.POS_PREFIX: ((schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CONTEXT, schema.POS_FEATURES,
                         schema.POS_CAPTIONS), schema.NEG_PREFIX),
    schema.NEG_PREFIX: ((schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CONTEXT, schema.NEG_FEATURES,
                         schema.NEG_CAPTIONS), schema.POS_PREFIX),
}

# ---------------------------------------------------------------------------------------------- schemas
def _strict_int(value: Any) -> Any:
    if type(value) is not int:  # bool is an int subclass; floats and strings are not scores either
        raise ValueError(f"a score must be an integer, got {type(value).__name__} {value!r}")
    return value


@functools.lru_cache(maxsize=1)
def scores_model() -> type:
    """The pydantic model of the scores answer (built on use: pydantic is an optional extra)."""
    import pydantic
    # Literal alone takes true and 1.0 for 1 (they compare equal): a score must be a JSON integer
    score = (Annotated[Literal[1, 2, 3, 4, 5], pydantic.BeforeValidator(_strict_int)], ...)
    return pydantic.create_model("JudgeScores", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **{name: score for name in schema.SCORES}, **{schema.REASON: (str, ...)})


@functools.lru_cache(maxsize=4096)
def twin_model(labels: tuple[str, str]) -> type:
    """The twin-check answer model: the choice must be one of the two ``labels`` (an enum in the schema)."""
    import pydantic
    return pydantic.create_model("JudgeTwin", __config__=pydantic.ConfigDict(extra="forbid"),
                                 **{schema.TWIN_CHOICE: (Literal[labels], ...)})  # type: ignore[valid-type]


def twin_labels(job: Mapping) -> tuple[str, str]:
    """The names shown in the twin check, sorted (so their order never hints at the answer); the country
    is added when both concepts have the same name."""
    own, twin = job[schema.CONCEPT], job[schema.TWIN_CONCEPT]
    if own.strip().casefold() == twin.strip().casefold():
        own = f"{own} ({job[schema.COUNTRY]})"
        twin = f"{twin} ({job[schema.TWIN_COUNTRY]})"
    if own == twin:
        raise ValueError(f"twin pair {job[schema.TWIN_ID]}: both sides are {own!r}; the twin check cannot "
                         f"tell them apart (fix the pair's concepts or countries)")
    return tuple(sorted((own, twin)))  # type: ignore[return-value]


def own_label(job: Mapping) -> str:
    """The label of the job's own concept among :func:`twin_labels`."""
    own, twin = job[schema.CONCEPT], job[schema.TWIN_CONCEPT]
    return f"{own} ({job[schema.COUNTRY]})" if own.strip().casefold() == twin.strip().casefold() else own


# ---------------------------------------------------------------------------------------------- jobs
def judge_jobs(pairs: Sequence[Mapping], render_records: Iterable[Mapping], chat: ChatConfig,
               render_dir: Optional[Path] = None, counts: Optional[dict] = None) -> Iterator[Job]:
    """The judge jobs: every current rendered image of every side of every twin pair, against that pair's twin.

    Args:
        pairs: twin caption sets (the current ``pairs``/``captions`` records).
        render_records: the render stage's current records (streamed).
        chat: the judge's chat settings (the model and temperature are in every key).
        render_dir: the render folder; image paths in the jobs are resolved against it.

        counts: filled with the numbers of ``captions`` looked up and ``captions_without_image``.

    Yields:
        Jobs (a generator: the runner keeps only their keyed dicts): a job's inputs are the render key and
        image sha256 and every pair field its prompts carry (concept, country, category, context, features,
        the twin's concept and country).
    """
    return jobs_from_slots(caption_slots(pairs, render_records), chat, render_dir, counts)


def caption_slots(pairs: Sequence[Mapping], render_records: Iterable[Mapping]) -> dict[tuple, tuple[list, list]]:
    """caption identity -> ``([(pair, side) using it], [its renders])``: one table, keyed by the pairs' own
    strings, holding of each render only its key and sha256 (a million renders stay a few hundred MB).
    Built once per run: the runner asks for the jobs twice (keys, then the unfinished jobs)."""
    slots: dict[tuple, tuple[list, list]] = {}
    for pair in pairs:
        for side, (fields, _) in SIDES.items():
            for caption in dict.fromkeys(pair[fields[4]]):  # unique, in order
                ident = (pair[fields[0]], pair.get(fields[1]), pair[schema.CATEGORY], caption)
                slots.setdefault(ident, ([], []))[0].append((pair, side))
    for rec in render_records:
        slot = slots.get((rec[schema.CONCEPT], rec.get(schema.COUNTRY), rec[schema.CATEGORY], rec[schema.CAPTION]))
        if slot is not None:
            key, rel = rec[schema.REC_KEY], rec[schema.IMAGE_FILE]
            slot[1].append((key, rec[schema.IMAGE_SHA256]) if rel == image_file(key) else
                           (key, rec[schema.IMAGE_SHA256], rel))
    return slots


def jobs_from_slots(slots: Mapping[tuple, tuple[list, list]], chat: ChatConfig, render_dir: Optional[Path] = None,
                    counts: Optional[dict] = None) -> Iterator[Job]:
    """The jobs of :func:`judge_jobs` from its :func:`caption_slots` table."""
    counts = counts if counts is not None else {}
    counts.update(captions=0, captions_without_image=0)
    root = str(render_dir) if render_dir is not None else ""
    settings = {"sampling": chat.sampling()}  # one dict shared by every job
    for uses, renders in slots.values():
        counts["captions"] += len(uses)
        counts["captions_without_image"] += 0 if renders else len(uses)
        for pair, side in uses:
            fields, other = SIDES[side]
            inputs = {schema.TWIN_ID: pair[schema.TWIN_ID], schema.SIDE: side, schema.CATEGORY: pair[schema.CATEGORY],
                      schema.CONCEPT: pair[fields[0]], schema.COUNTRY: pair.get(fields[1]),
                      schema.CONTEXT: pair.get(fields[2]), schema.FEATURES: list(pair.get(fields[3]) or []),
                      schema.TWIN_CONCEPT: pair[SIDES[other][0][0]], schema.TWIN_COUNTRY: pair.get(SIDES[other][0][1])}
            twin_labels(inputs)  # validates now, naming the pair, rather than mid-run
            for render_key, sha, *rel in renders:
                image = os.path.join(root, rel[0] if rel else image_file(render_key))  # pathlib: ~60 us a job
                yield Job(inputs={**inputs, schema.RENDER_KEY: render_key, schema.IMAGE_SHA256: sha},
                          model=chat.model, prompts=PROMPTS, settings=settings, extra={schema.IMAGE_FILE: image})


def scores_messages(job: Mapping, image: dict) -> list[dict]:
    """The scores request: the image, then the paper's rubric for the job's own concept."""
    country = job.get(schema.COUNTRY)
    details = ""
    if job.get(schema.CONTEXT):
        details += f"Context: {job[schema.CONTEXT]}\n"
    if job.get(schema.FEATURES):
        details += f"Key visual features: {'; '.join(job[schema.FEATURES])}\n"
    text = load_prompt("judge_scores").format(
        concept=job[schema.CONCEPT], category=job[schema.CATEGORY], details=details,
        from_country=f" from {country}" if country else "", for_country=f" for {country}" if country else "",
        a=schema.SCORE_AUTHENTICITY, c=schema.SCORE_CONSISTENCY, f=schema.SCORE_FIDELITY, r=schema.REASON)
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def twin_messages(job: Mapping, image: dict) -> list[dict]:
    """The blind twin-check request: the image and both names, nothing that tells which is meant."""
    options = " and ".join(f'"{label}"' for label in twin_labels(job))
    text = load_prompt("judge_twin").format(category=job[schema.CATEGORY], options=options)
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def judge_record(job: Mapping, scores: Any, twin: Any, model: str) -> dict:
    """The record of one judged image from the two validated answers."""
    choice = getattr(twin, schema.TWIN_CHOICE)
    own = choice == own_label(job)
    picked = job[schema.CONCEPT] if own else job[schema.TWIN_CONCEPT]
    return {schema.RENDER_KEY: job[schema.RENDER_KEY], schema.TWIN_ID: job[schema.TWIN_ID],
            schema.SIDE: job[schema.SIDE], schema.CATEGORY: job[schema.CATEGORY],
            schema.CONCEPT: job[schema.CONCEPT], schema.COUNTRY: job[schema.COUNTRY],
            schema.TWIN_CONCEPT: job[schema.TWIN_CONCEPT], schema.TWIN_COUNTRY: job[schema.TWIN_COUNTRY],
            schema.IMAGE_SHA256: job[schema.IMAGE_SHA256],
            **{name: getattr(scores, name) for name in schema.SCORES},
            schema.TWIN_CHOICE: picked, schema.PICKS_OWN: own, schema.REASON: bound(getattr(scores, schema.REASON)),
            schema.MODEL_ID: model}


def _read_image(job: Mapping) -> bytes:
    path = Path(job[schema.IMAGE_FILE])
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _JobError("image_missing", f"{path}: {exc}") from None
    if hashlib.sha256(data).hexdigest() != job[schema.IMAGE_SHA256]:
        raise _JobError("image_changed", f"{path} does not match the sha256 its render record holds")
    return data


class _JobError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


def make_process(client: ChatClient):
    """The stage's ``process``: two requests per job through ``client.ask_many``, one Outcome per job."""
    model = client.cfg.model

    def process(jobs: Iterator[Mapping]) -> Iterator[Outcome]:
        failed: deque = deque()  # jobs whose image could not be read: no request is sent
        waiting: dict[str, Mapping] = {}
        answers: dict[str, dict] = {}

        def requests() -> Iterator[tuple]:
            for job in jobs:
                try:
                    image = image_part(_read_image(job))
                except _JobError as exc:
                    failed.append(Outcome(job[schema.REC_KEY], error=exc.reason, message=exc.message))
                    continue
                waiting[job[schema.REC_KEY]] = job
                yield (job[schema.REC_KEY], SCORES_SCHEMA), scores_messages(job, image), scores_model(), SCORES_SCHEMA
                yield ((job[schema.REC_KEY], TWIN_SCHEMA), twin_messages(job, image), twin_model(twin_labels(job)),
                       TWIN_SCHEMA)

        for (key, part), answer in client.ask_many(requests()):
            while failed:
                yield failed.popleft()
            got = answers.setdefault(key, {})
            got[part] = answer
            if len(got) == 2:
                del answers[key]
                yield _outcome(waiting.pop(key), got[SCORES_SCHEMA], got[TWIN_SCHEMA], model)
        while failed:
            yield failed.popleft()

    return process


def _outcome(job: Mapping, scores: ChatAnswer, twin: ChatAnswer, model: str) -> Outcome:
    key = job[schema.REC_KEY]
    attempts = max(scores.attempts, twin.attempts)
    if scores.ok and twin.ok:
        return Outcome(key, record=judge_record(job, scores.value, twin.value, model), attempts=attempts)
    bad = [(what, a) for what, a in (("scores", scores), ("twin check", twin)) if not a.ok]
    return Outcome(key, error=bad[0][1].error, attempts=attempts,
                   message="; ".join(f"{what}: {a.error}: {a.message}" for what, a in bad))


# ---------------------------------------------------------------------------------------------- stage
def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value


def chat_config(cfg: Mapping, ctx: Any) -> ChatConfig:
    """The judge's chat settings: ``cfg.chat`` overridden key by key by the run's non-null ``ctx.chat``
    (:func:`~cultureclip.curate.backends.chat.effective_chat`)."""
    run_chat = _plain(getattr(ctx, "chat", None) or {})
    return ChatConfig.from_mapping(effective_chat(_plain(cfg.get("chat") or {}), run_chat))


def plan_fingerprint(chat: ChatConfig, upstream: Sequence[Store]) -> str:
    """What the judge's plan depends on besides its inputs: the model, its sampling settings, the prompt texts
    and the current render and pairs views (see :func:`~cultureclip.curate.runner.run.up_to_date`)."""
    return fingerprint({"model": chat.model, "sampling": chat.sampling()}, PROMPTS, upstream)


def run(cfg: Mapping, ctx: Any) -> StageReport:
    """Judge every current rendered image of ``ctx.out_dir`` (see the module docstring).

    Args:
        cfg: the ``judge`` config group: ``chat`` (overrides of the run's chat settings) and
            ``part_size`` (records per part file: at most that much is redone after a crash).
        ctx: the run's :class:`~cultureclip.curate.registry.Context`.

    Raises:
        FileNotFoundError, ValueError: the caption sets or the render view are missing or incomplete.
    """
    from cultureclip.curate.stages.importer import load_pairs, pairs_store
    cfg = typed(JudgeSettings, _plain(cfg or {}), "judge")
    chat = chat_config(cfg, ctx)
    source = pairs_store(ctx.out_dir)
    source.require_complete(STAGE)
    render_store = Store(ctx.stage_dir(RENDER_STAGE), RENDER_STAGE)
    render_store.require_complete(STAGE, upstream=(source,))
    store = Store(ctx.stage_dir(STAGE), STAGE)
    # the render view's digest stands for its records: a current render record is never rewritten (its
    # image is a function of its key, and gc only removes records outside the view)
    fp = plan_fingerprint(chat, (render_store, source))
    done = up_to_date(store, fp, ctx.shard_index, ctx.num_shards)
    if done is not None:  # planned from these views and prompts, every job finished: nothing is read again
        return done
    pairs = load_pairs(ctx.out_dir, STAGE)
    counts: dict = {}
    slots = caption_slots(pairs, render_store.records())  # the render store is read once
    jobs = lambda: jobs_from_slots(slots, chat, render_store.root, counts)  # noqa: E731 (streamed)
    client = LazyChatClient(chat)
    try:
        report = run_stage(store, jobs, make_process(client), shard_index=ctx.shard_index,
                           num_shards=ctx.num_shards, retry_errors=ctx.retry_errors,
                           part_size=int(cfg.get("part_size", 256)), upstream=(render_store, source),
                           fingerprint=fp)
    finally:
        client.close()
    report.extra.update(counts)
    save_report(store, report)  # with the stage's own figures
    log.info("judge %s: %d judged, %d errors %s, %d done before", report.job, report.ok, report.errors,
             report.errors_by_reason or "", report.done_before)
    return report


def standin_responders() -> dict:
    """The stand-in server's answers for the judge's two requests (:mod:`cultureclip.curate.stages.judge_standin`)."""
    from cultureclip.curate.stages.judge_standin import responders
    return responders()
