"""Stage ``captions``: n captions per concept, then the twin caption sets (the "pairs" records).

Pass 1 (store ``captions/sets``): one job per distinct concept of the twins records (both sides).
Each caption must have fewer than 15 words (``max_words``: 14), name the concept (``require_name``)
and at least one of its key visual features, and be set in a scene of its own; captions and scenes
are deduplicated after normalisation. A request asks for the captions still missing, listing those
already accepted; after ``max_rounds`` requests a set that is still short is an error record with the
rejection counts, never padded. A set with more valid captions than asked keeps the first ``n``.

Pass 2 (store ``captions``): one record per twin pair in the pairs format (``twin_id``, category,
``pos_*``/``neg_*`` concept, country, context, features, captions), which render reads through
``load_pairs``. A twin pair seen from both sides (A's twin B and B's twin A) is written once. A pair
whose caption set failed is an error naming the set; with several job ranges (``num_shards``), a pair
whose set another range has not written yet is a ``caption_set_pending`` error, redone on the next run.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from cultureclip import schema
from cultureclip.curate.stages import settings as stage_settings
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.stages.settings import typed
from cultureclip.curate.stages.captions_prompts import PROMPTS, caption_messages, caption_schema, standin_responders
from cultureclip.curate.stages.importer import set_pairs_source, twin_id
from cultureclip.curate.runner import Job, Outcome, Store, canonical_json, plan, run_stage
from cultureclip.curate.stages.twins import load_twins
from cultureclip.curate.stages.twins_prompts import TWIN_FIELDS

NAME = "captions"
SETS = "sets"
SETS_STAGE = "caption_sets"
STOP = {"with", "and", "the", "of", "on", "in", "a", "an", "at", "for", "to", "its", "from", "by"}
__all__ = ["run", "card_section", "standin_responders", "check_caption"]


def _content_words(text: str) -> set:
    return {w for w in up.normalize_name(text).split() if w not in STOP and len(w) > 2}


def check_caption(caption: str, scene: str, concept: Mapping, seen: set, scenes: set, max_words: int,
                  require_name: bool) -> Optional[str]:
    """Why a caption is rejected (None: accepted); ``seen``/``scenes`` hold the normalised accepted ones."""
    norm = up.normalize_name(caption)
    if not norm:
        return "empty"
    if len(caption.split()) > max_words:
        return "too_long"
    if norm in seen:
        return "duplicate"
    if not up.normalize_name(scene) or up.normalize_name(scene) in scenes:
        return "duplicate_scene"
    names = [up.normalize_name(concept.get(f) or "") for f in (schema.CONCEPT, schema.NATIVE_NAME)]
    if require_name and not any(n and f" {n} " in f" {norm} " for n in names):
        return "no_concept_name"
    words = set(norm.split())
    if not any(_content_words(f) & words for f in concept.get(schema.FEATURES) or []):
        return "no_feature"
    return None


def side_of(c: Mapping) -> dict:
    """A concept's fields that its captions depend on."""
    return {f: c.get(f) for f in TWIN_FIELDS}


def set_settings(cfg: Mapping) -> dict:
    """The settings a caption set depends on (in its key)."""
    return {"n": int(cfg.get("n", 10)), "max_words": int(cfg.get("max_words", 14)),
            "require_name": bool(cfg.get("require_name", True)), "max_rounds": int(cfg.get("max_rounds", 3))}


def _ident(side: Mapping) -> str:
    return canonical_json(side)


def twin_pairs(twins: list[dict]) -> tuple[list[tuple[str, dict, dict]], int]:
    """``(twin_id, pos, neg)`` of every kept twin, each unordered pair once; and how many mirrored ones were dropped."""
    best: dict[tuple, tuple[str, dict, dict]] = {}
    for rec in twins:
        pos = side_of(rec)
        for t in rec[schema.TWINS]:
            neg = side_of({**t, schema.CATEGORY: rec[schema.CATEGORY]})
            tid = twin_id(rec[schema.CATEGORY], pos[schema.CONCEPT], pos[schema.COUNTRY], neg[schema.CONCEPT],
                          neg[schema.COUNTRY])
            ident = (rec[schema.CATEGORY], frozenset({(up.normalize_name(s[schema.CONCEPT]), s[schema.COUNTRY])
                                                      for s in (pos, neg)}))
            if ident not in best or tid < best[ident][0]:
                best[ident] = (tid, pos, neg)
    pairs = sorted(best.values(), key=lambda p: p[0])
    return pairs, sum(len(r[schema.TWINS]) for r in twins) - len(pairs)


def _sets_pass(cfg, ctx, sides, model) -> tuple[Store, dict]:
    client, _, sampling = up.chat_client(cfg, ctx)
    st = set_settings(cfg)
    n, max_words, rounds, require = st["n"], st["max_words"], st["max_rounds"], st["require_name"]
    keyed = {**st, "sampling": sampling}
    jobs = [Job(inputs={"side": s}, model=model, prompts=PROMPTS, settings=keyed) for _, s in sorted(sides.items())]
    store = Store(ctx.stage_dir(NAME) / SETS, SETS_STAGE)
    upstream = (up.stage_store(ctx.out_dir, "twins"),)
    planned, _ = plan(store, jobs, upstream)

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        cap_schema = caption_schema()
        for chunk in up.chunked(todo, int(cfg.get("chunk", 64))):
            state = {j[schema.REC_KEY]: {"side": j["side"], "caps": [], "scenes": [], "rej": Counter(), "rounds": 0}
                     for j in chunk}
            for _ in range(rounds):
                open_ = [(k, s) for k, s in state.items() if len(s["caps"]) < n and "error" not in s]
                reqs = [(k, caption_messages(s["side"], n - len(s["caps"]), s["caps"], s["scenes"]), cap_schema)
                        for k, s in open_]
                for key, ans in client.ask_many(reqs):
                    s = state[key]
                    s["rounds"] += 1
                    if ans.value is None:
                        s["error"] = ans
                        continue
                    seen = {up.normalize_name(c) for c in s["caps"]}
                    scenes = {up.normalize_name(c) for c in s["scenes"]}
                    for item in ans.value.model_dump()[schema.CAPTIONS]:
                        cap, scene = item[schema.CAPTION].strip(), item[schema.SCENE].strip()
                        reason = check_caption(cap, scene, s["side"], seen, scenes, max_words, require)
                        if reason is None and len(s["caps"]) >= n:
                            reason = "over_count"
                        if reason:
                            s["rej"][reason] += 1
                            continue
                        s["caps"].append(cap)
                        s["scenes"].append(scene)
                        seen.add(up.normalize_name(cap))
                        scenes.add(up.normalize_name(scene))
            for key, s in state.items():
                yield _set_outcome(key, s, n, model)

    try:
        run_stage(store, jobs, process, shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                  retry_errors=ctx.retry_errors, upstream=upstream, keyed_jobs=planned)
    finally:
        client.close()
    return store, {j[schema.REC_KEY]: _ident(j["side"]) for j in planned}


def _set_outcome(key: str, s: dict, n: int, model: str) -> Outcome:
    if "error" in s:
        a = s["error"]
        return Outcome(key, error=a.error or "no_answer", message=a.message, attempts=a.attempts)
    if len(s["caps"]) < n:  # every round was answered, validly: the set is rejected, not asked for again
        return Outcome(key, rejected="incomplete_caption_set", attempts=s["rounds"],
                       message=f"{s['side'][schema.CONCEPT]} ({s['side'][schema.COUNTRY]}): {len(s['caps'])} of {n} "
                               f"valid captions after {s['rounds']} requests; "
                               f"rejected: {dict(sorted(s['rej'].items()))}")
    return Outcome(key, attempts=s["rounds"], record={
        **s["side"], schema.CAPTIONS: s["caps"], schema.SCENES: s["scenes"], schema.ROUNDS: s["rounds"],
        schema.REJECTED: dict(sorted(s["rej"].items())), schema.MODEL_ID: model})


def run(cfg: Mapping, ctx: Any):
    """Run both passes over the current ``twins`` view; return the pairs pass's report.

    A pair job's inputs are both sides' fields and both caption sets' captions, so a changed set reruns
    exactly the pairs that use it. The captions store becomes the run's current twin caption sets.
    """
    cfg = typed(stage_settings.Captions, up.plain(cfg), NAME)
    model = str(up.chat_settings(cfg, ctx)["model"])
    pairs, mirrored = twin_pairs(load_twins(ctx.out_dir, NAME))
    sides = {}
    for _, pos, neg in pairs:
        for s in (pos, neg):
            sides[_ident(s)] = s
    set_store, side_of_key = _sets_pass(cfg, ctx, sides, model)
    index = set_store.index()
    sets = {side_of_key[r[schema.REC_KEY]]: r for r in set_store.records(side_of_key, index)}
    rejected = {side_of_key[r[schema.REC_KEY]]: r[schema.REC_MESSAGE] for r in set_store.rejections(side_of_key, index)}
    jobs = []
    for tid, pos, neg in pairs:
        inputs: dict[str, Any] = {schema.TWIN_ID: tid, schema.CATEGORY: pos[schema.CATEGORY]}
        for prefix, side in ((schema.POS_PREFIX, pos), (schema.NEG_PREFIX, neg)):
            for f in (schema.CONCEPT, schema.COUNTRY, schema.CONTEXT, schema.FEATURES):
                inputs[f"{prefix}_{f}"] = side[f]
            got = sets.get(_ident(side))
            inputs[f"{prefix}_{schema.CAPTIONS}"] = got[schema.CAPTIONS] if got else None
            if got is None:
                inputs.setdefault("_problem", (f"{prefix} side {side[schema.CONCEPT]} ({side[schema.COUNTRY]})",
                                               rejected.get(_ident(side))))
        jobs.append(Job(inputs=inputs))

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        for job in todo:
            problem = job.get("_problem")
            if problem is None:
                yield Outcome(job[schema.REC_KEY], record={k: v for k, v in job.items() if k != schema.REC_KEY})
            elif problem[1] is not None:  # the set was rejected: so is the pair, for good
                yield Outcome(job[schema.REC_KEY], rejected="caption_set_rejected",
                              message=f"{problem[0]}: {problem[1]}")
            else:
                yield Outcome(job[schema.REC_KEY], error="caption_set_pending",
                              message=f"{problem[0]}: caption set not written yet (another job range, or an error "
                                      f"to retry)")

    report = run_stage(Store(ctx.stage_dir(NAME), NAME), jobs, process, shard_index=ctx.shard_index,
                       num_shards=ctx.num_shards, retry_errors=ctx.retry_errors, upstream=(set_store,))
    set_pairs_source(ctx.out_dir, NAME)
    report.extra["mirrored_pairs_dropped"] = mirrored
    return report


def card_section(out_dir: Any) -> dict:
    """Caption sets made and rejected, caption rejections by reason, twin pairs by country pair and category."""
    root = Path(out_dir) / NAME
    set_store, pair_store = Store(root / SETS, SETS_STAGE), Store(root, NAME)
    sets, set_status = list(set_store.records()), set_store.status()
    rejected = sum((Counter(r[schema.REJECTED]) for r in sets), Counter())
    rounds = Counter(str(r[schema.ROUNDS]) for r in sets)
    pairs, pair_status = list(pair_store.records()), pair_store.status()
    by_pair = Counter(" / ".join(sorted((p[schema.POS_COUNTRY] or "?", p[schema.NEG_COUNTRY] or "?"))) for p in pairs)
    by_cat = Counter(p[schema.CATEGORY] for p in pairs)
    set_fail = Counter({**set_status["rejected_by_reason"], **set_status["errors_by_reason"]})
    pair_fail = Counter({**pair_status["rejected_by_reason"], **pair_status["errors_by_reason"]})
    data = {"caption_sets": len(sets), "caption_sets_failed": up.counts(set_fail),
            "captions_rejected_by_reason": up.counts(rejected), "requests_per_set": up.counts(rounds),
            "twin_pairs": len(pairs), "twin_pairs_failed": up.counts(pair_fail),
            "by_country_pair": up.counts(by_pair), "by_category": up.counts(by_cat)}
    md = (f"{len(sets)} caption sets complete, {sum(set_fail.values())} rejected or failed; {len(pairs)} twin pairs "
          f"with captions, {sum(pair_fail.values())} rejected or failed.\n\n**Rejected captions**\n\n"
          + up.counter_md(rejected) + "\n**Rejected or failed caption sets**\n\n" + up.counter_md(set_fail)
          + "\n**Requests per caption set**\n\n" + up.counter_md(rounds, ("requests", "sets"))
          + "\n**Twin pairs by country pair**\n\n" + up.counter_md(by_pair, ("countries", "pairs"))
          + "\n**Twin pairs by category**\n\n" + up.counter_md(by_cat, ("category", "pairs")))
    return {"title": "Captions", "markdown": md, "data": data}
