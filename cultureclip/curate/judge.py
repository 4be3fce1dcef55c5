"""The judge stage: a vision-language model scores every rendered image and checks it against its twin.

For each twin pair, each side, each rendered image of that side's captions, two structured requests
go to an OpenAI-compatible server (:mod:`cultureclip.curate.chat`), the image first in both (so a
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
from collections import Counter, deque
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate.chat import ChatAnswer, ChatClient, ChatConfig, effective_chat, image_part
from cultureclip.curate.records import Outcome, StageReport, StageStore, record_key
from cultureclip.curate.sanitize import bound
from cultureclip.curate.judge_rule import DEFAULT_RULE, card_section, check_rule, passes  # noqa: F401 (API)
from cultureclip.curate.standin import request_images

log = logging.getLogger(__name__)

STAGE = "judge"
RENDER_STAGE = "render"
PROMPT_VERSION = "judge-v1"  # bump whenever a prompt or answer schema below changes
SCORES_SCHEMA = "judge_scores_v1"  # the response_format names (the stand-in dispatches on them)
TWIN_SCHEMA = "judge_twin_v1"
CONFIG_KEYS = ("chat", "part_size")
SIDES = {  # side -> (concept, country, context, features, captions) of the pair record, and the other side
    schema.POS_PREFIX: ((schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CONTEXT, schema.POS_FEATURES,
                         schema.POS_CAPTIONS), schema.NEG_PREFIX),
    schema.NEG_PREFIX: ((schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CONTEXT, schema.NEG_FEATURES,
                         schema.NEG_CAPTIONS), schema.POS_PREFIX),
}

SCORES_PROMPT = """You are an expert on world cultures, judging an AI-generated image.
The image was generated to show "{concept}", a {category} concept{from_country}.
{details}Rate the image on each criterion with an integer from 1 (very poor) to 5 (excellent):
- {a}: does it look like a real, natural photograph, free of generation artefacts?
- {c}: does it clearly show "{concept}" as described, with its key visual features?
- {f}: are its cultural details (setting, materials, style, people) accurate{for_country}?
Then give a one-sentence {r}. Answer with JSON only."""

TWIN_PROMPT = """This image shows one of two {category} concepts, listed in alphabetical order: {options}.
Which one does it show? Answer with JSON only, giving the name exactly as listed."""


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
def judge_key(render_key: str, image_sha256: str, category: str, concept: str, country: Optional[str],
              twin_concept: str, twin_country: Optional[str], model: str) -> str:
    """The key of one judge record (also what export uses to find it)."""
    return record_key(STAGE, {schema.RENDER_KEY: render_key, schema.IMAGE_SHA256: image_sha256,
                              schema.CATEGORY: category, schema.CONCEPT: concept, schema.COUNTRY: country,
                              schema.TWIN_CONCEPT: twin_concept, schema.TWIN_COUNTRY: twin_country},
                      model=model, prompt_version=PROMPT_VERSION)


def judge_jobs(pairs: Sequence[Mapping], render_records: Sequence[Mapping], model: str,
               render_dir: Optional[Path] = None) -> tuple[list[dict], dict]:
    """The judge jobs: every rendered image of every side of every twin pair, against that pair's twin.

    Args:
        pairs: twin caption sets (the ``pairs``/``captions`` records).
        render_records: the render stage's records.
        model: the judge model id (part of every key).
        render_dir: the render folder; image paths in the jobs are resolved against it.

    Returns:
        ``(jobs, counts)``: the jobs (unique keys; an image judged against the same twin through two
        listings of one pair is one job), and counts of ``captions`` looked up, ``captions_without_image``
        and ``duplicate_jobs`` merged.
    """
    by_caption: dict[tuple, list[Mapping]] = {}
    for rec in render_records:
        ident = (rec[schema.CONCEPT], rec.get(schema.COUNTRY), rec[schema.CATEGORY], rec[schema.CAPTION])
        by_caption.setdefault(ident, []).append(rec)
    jobs: dict[str, dict] = {}
    counts = Counter(captions=0, captions_without_image=0, duplicate_jobs=0)
    for pair in pairs:
        category = pair[schema.CATEGORY]
        for side, (fields, other) in SIDES.items():
            concept_f, country_f, context_f, features_f, captions_f = fields
            concept, country = pair[concept_f], pair.get(country_f)
            twin_concept, twin_country = pair[SIDES[other][0][0]], pair.get(SIDES[other][0][1])
            for caption in dict.fromkeys(pair[captions_f]):  # unique, in order
                counts["captions"] += 1
                renders = by_caption.get((concept, country, category, caption), [])
                counts["captions_without_image"] += not renders
                for rec in renders:
                    key = judge_key(rec[schema.REC_KEY], rec[schema.IMAGE_SHA256], category, concept, country,
                                    twin_concept, twin_country, model)
                    if key in jobs:
                        counts["duplicate_jobs"] += 1
                        continue
                    image = Path(rec[schema.IMAGE_FILE])
                    jobs[key] = {
                        schema.REC_KEY: key, schema.RENDER_KEY: rec[schema.REC_KEY], schema.TWIN_ID: pair[schema.TWIN_ID],
                        schema.SIDE: side, schema.CATEGORY: category, schema.CONCEPT: concept,
                        schema.COUNTRY: country, schema.CONTEXT: pair.get(context_f),
                        schema.FEATURES: list(pair.get(features_f) or []), schema.TWIN_CONCEPT: twin_concept,
                        schema.TWIN_COUNTRY: twin_country, schema.IMAGE_SHA256: rec[schema.IMAGE_SHA256],
                        schema.IMAGE_FILE: str(render_dir / image if render_dir is not None else image)}
                    twin_labels(jobs[key])  # validates now, naming the pair, rather than mid-run
    return list(jobs.values()), dict(counts)


def scores_messages(job: Mapping, image: dict) -> list[dict]:
    """The scores request: the image, then the paper's rubric for the job's own concept."""
    country = job.get(schema.COUNTRY)
    details = ""
    if job.get(schema.CONTEXT):
        details += f"Context: {job[schema.CONTEXT]}\n"
    if job.get(schema.FEATURES):
        details += f"Key visual features: {'; '.join(job[schema.FEATURES])}\n"
    text = SCORES_PROMPT.format(concept=job[schema.CONCEPT], category=job[schema.CATEGORY], details=details,
                                from_country=f" from {country}" if country else "",
                                for_country=f" for {country}" if country else "",
                                a=schema.SCORE_AUTHENTICITY, c=schema.SCORE_CONSISTENCY, f=schema.SCORE_FIDELITY,
                                r=schema.REASON)
    return [{"role": "user", "content": [image, {"type": "text", "text": text}]}]


def twin_messages(job: Mapping, image: dict) -> list[dict]:
    """The blind twin-check request: the image and both names, nothing that tells which is meant."""
    options = " and ".join(f'"{label}"' for label in twin_labels(job))
    text = TWIN_PROMPT.format(category=job[schema.CATEGORY], options=options)
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
            schema.MODEL_ID: model, schema.PROMPT_VERSION: PROMPT_VERSION}


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
    (:func:`~cultureclip.curate.chat.effective_chat`)."""
    return ChatConfig.from_mapping(effective_chat(_plain(cfg.get("chat") or {}), _plain(getattr(ctx, "chat", None) or {})))


def run(cfg: Mapping, ctx: Any, pairs: Optional[Sequence[Mapping]] = None) -> StageReport:
    """Judge every rendered image of ``ctx.out_dir`` (see the module docstring).

    Args:
        cfg: the ``judge`` config group: ``chat`` (overrides of the run's chat settings) and
            ``part_size`` (records per part file: at most that much is redone after a crash).
        ctx: the run's :class:`~cultureclip.curate.registry.Context`.
        pairs: the twin caption sets; default: :func:`cultureclip.curate.importer.load_pairs`.
    """
    cfg = _plain(cfg or {})
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown judge settings {unknown}; known: {list(CONFIG_KEYS)}")
    chat = chat_config(cfg, ctx)
    if pairs is None:
        from cultureclip.curate.importer import load_pairs
        pairs = load_pairs(ctx.out_dir)
    render_dir = ctx.stage_dir(RENDER_STAGE)
    if not render_dir.is_dir():
        raise FileNotFoundError(f"no rendered images to judge: {render_dir} does not exist (run stage=render)")
    jobs, counts = judge_jobs(pairs, StageStore(render_dir, RENDER_STAGE).records(), chat.model, render_dir)
    if counts["captions_without_image"]:
        log.warning("judge: %d of %d captions have no rendered image (render unfinished or failed); judging the "
                    "%d images there are", counts["captions_without_image"], counts["captions"], len(jobs))
    store = StageStore(ctx.stage_dir(STAGE), STAGE, {schema.MODEL_ID: chat.model,
                                                    schema.PROMPT_VERSION: PROMPT_VERSION,
                                                    "temperature": chat.temperature})
    with ChatClient(chat) as client:
        report = store.run(jobs, make_process(client), shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                           retry_errors=ctx.retry_errors, part_size=int(cfg.get("part_size", 256)))
    report.extra.update(counts)
    store.save_report(report)  # with the stage's own figures
    log.info("judge %s: %d judged, %d errors %s, %d done before", report.job, report.ok, report.errors,
             report.errors_by_reason or "", report.done_before)
    return report


# ---------------------------------------------------------------------------------------------- stand-in
_STANDIN_SCORES = (1, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 5, 4, 3, 5)  # by a hash byte: P(1) = 1/16 per score


def _standin_scores(body: dict) -> dict:
    digest = hashlib.sha256("".join(request_images(body)).encode()).digest()
    out = {name: _STANDIN_SCORES[digest[i] % 16] for i, name in enumerate(schema.SCORES)}
    return {**out, schema.REASON: "stand-in judge: scores derived from a hash of the image, not from looking"}


def _png_text(data_url: str) -> str:
    """The tEXt chunks of a PNG data URL (e.g. the prompt a renderer stored), lower-cased; "" if none.
    Read from the chunk headers, without decoding the image (the stand-in must stay cheap)."""
    import base64
    import struct
    try:
        data = base64.b64decode(data_url.split(",", 1)[1])
    except ValueError:
        return ""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return ""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            out.append(data[pos + 8:pos + 8 + length].split(b"\0", 1)[-1].decode("latin-1"))
        elif kind == b"IEND":
            break
        pos += 12 + length
    return " ".join(out).casefold()


def _standin_twin(body: dict) -> dict:
    options = body["response_format"]["json_schema"]["schema"]["properties"][schema.TWIN_CHOICE]["enum"]
    images = request_images(body)
    digest = hashlib.sha256(("twin:" + "".join(images)).encode()).digest()
    text = " ".join(_png_text(url) for url in images)
    named = [o for o in options if o.split(" (")[0].casefold() in text]
    if len(named) == 1:  # the image carries its prompt: pick that concept, wrong 1 time in 8
        return {schema.TWIN_CHOICE: named[0] if digest[0] % 8 else next(o for o in options if o != named[0])}
    return {schema.TWIN_CHOICE: options[digest[0] % len(options)]}


def standin_responders() -> dict:
    """Deterministic answers for the stand-in server (tests, the offline demo). The stand-in does not look
    at the pixels: scores come from a hash of the image bytes (about 1 image in 5 fails the rule on its
    scores). The twin check is blind, so the stand-in knows the answer only when the PNG carries its
    prompt in a text chunk (it then picks that concept 7 times in 8); otherwise it is a coin flip seeded
    by the image."""
    return {SCORES_SCHEMA: _standin_scores, TWIN_SCHEMA: _standin_twin}
