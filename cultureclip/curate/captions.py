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
from cultureclip.curate import upstream as up
from cultureclip.curate.captions_prompts import caption_messages, caption_schema, standin_responders
from cultureclip.curate.records import Outcome, StageStore, record_key
from cultureclip.curate.twins import load_twins
from cultureclip.curate.twins_prompts import TWIN_FIELDS

NAME = "captions"
SETS = "sets"
PROMPT_VERSION = "captions-v1"
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


def set_key(side: Mapping, cfg: Mapping, model: str) -> str:
    return record_key("caption_set", {**side, "n": int(cfg.get("n", 10)), "max_words": int(cfg.get("max_words", 14)),
                                      "require_name": bool(cfg.get("require_name", True))}, model, PROMPT_VERSION)


def twin_pairs(twins: list[dict]) -> tuple[list[tuple[str, dict, dict]], int]:
    """``(twin_id, pos, neg)`` of every kept twin, each unordered pair once; and how many mirrored ones were dropped."""
    best: dict[tuple, tuple[str, dict, dict]] = {}
    for rec in twins:
        pos = side_of(rec)
        for t in rec[schema.TWINS]:
            neg = side_of({**t, schema.CATEGORY: rec[schema.CATEGORY]})
            tid = record_key("twin", {schema.CATEGORY: rec[schema.CATEGORY], schema.POS_CONCEPT: pos[schema.CONCEPT],
                                      schema.POS_COUNTRY: pos[schema.COUNTRY], schema.NEG_CONCEPT: neg[schema.CONCEPT],
                                      schema.NEG_COUNTRY: neg[schema.COUNTRY]})
            ident = (rec[schema.CATEGORY], frozenset({(up.normalize_name(s[schema.CONCEPT]), s[schema.COUNTRY])
                                                      for s in (pos, neg)}))
            if ident not in best or tid < best[ident][0]:
                best[ident] = (tid, pos, neg)
    pairs = sorted(best.values(), key=lambda p: p[0])
    return pairs, sum(len(r[schema.TWINS]) for r in twins) - len(pairs)


def _sets_pass(cfg, ctx, sides, model) -> None:
    client, _ = up.chat_client(cfg, ctx)
    n, max_words, rounds = int(cfg.get("n", 10)), int(cfg.get("max_words", 14)), int(cfg.get("max_rounds", 3))
    require = bool(cfg.get("require_name", True))
    jobs = [{schema.REC_KEY: k, "side": s} for k, s in sorted(sides.items())]
    settings = {"model": model, "prompt_version": PROMPT_VERSION, "n": n, "max_words": max_words,
                "require_name": require, "max_rounds": rounds}
    store = StageStore(ctx.stage_dir(NAME) / SETS, "caption_sets", settings)
    up.write_current(ctx.stage_dir(NAME) / SETS, jobs)
    cap_schema = caption_schema()

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
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
        store.run(jobs, process, shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                  retry_errors=ctx.retry_errors)
    finally:
        client.close()


def _set_outcome(key: str, s: dict, n: int, model: str) -> Outcome:
    if "error" in s:
        a = s["error"]
        return Outcome(key, error=a.error or "no_answer", message=a.message, attempts=a.attempts)
    if len(s["caps"]) < n:
        return Outcome(key, error="incomplete_caption_set", attempts=s["rounds"],
                       message=f"{s['side'][schema.CONCEPT]} ({s['side'][schema.COUNTRY]}): {len(s['caps'])} of {n} "
                               f"valid captions after {s['rounds']} requests; "
                               f"rejected: {dict(sorted(s['rej'].items()))}")
    return Outcome(key, attempts=s["rounds"], record={
        **s["side"], schema.CAPTIONS: s["caps"], schema.SCENES: s["scenes"], schema.ROUNDS: s["rounds"],
        schema.REJECTED: dict(sorted(s["rej"].items())), schema.MODEL_ID: model, schema.PROMPT_VERSION: PROMPT_VERSION})


def run(cfg: Mapping, ctx: Any):
    """Run both passes over the ``twins`` store; return the pairs pass's report."""
    cfg = up.plain(cfg)
    model = str(up.chat_settings(cfg, ctx)["model"])
    up.require_complete(ctx.stage_dir("twins"), "twins", NAME)
    pairs, mirrored = twin_pairs(load_twins(ctx.out_dir))
    sides = {}
    for _, pos, neg in pairs:
        for s in (pos, neg):
            sides[set_key(s, cfg, model)] = s
    _sets_pass(cfg, ctx, sides, model)
    set_store = StageStore(ctx.stage_dir(NAME) / SETS, "caption_sets")
    sets = {r[schema.REC_KEY]: r for r in set_store.records()}
    failed = set_store.errors()
    jobs = [{schema.REC_KEY: tid, "pos": pos, "neg": neg} for tid, pos, neg in pairs]
    store = StageStore(ctx.stage_dir(NAME), NAME, {"model": model, "prompt_version": PROMPT_VERSION,
                                                   "n": int(cfg.get("n", 10))})
    up.write_current(ctx.stage_dir(NAME), jobs)

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        for job in todo:
            rec = {schema.TWIN_ID: job[schema.REC_KEY], schema.CATEGORY: job["pos"][schema.CATEGORY]}
            problem = None
            for prefix in (schema.POS_PREFIX, schema.NEG_PREFIX):
                side = job["pos" if prefix == schema.POS_PREFIX else "neg"]
                key = set_key(side, cfg, model)
                if key not in sets:
                    problem = problem or (("caption_set_failed" if key in failed else "caption_set_pending"),
                                          f"{prefix} side {side[schema.CONCEPT]} ({side[schema.COUNTRY]}): caption "
                                          f"set {key} " + (failed[key][schema.REC_MESSAGE] if key in failed
                                                           else "not written yet (another job range?)"))
                    continue
                for f in (schema.CONCEPT, schema.COUNTRY, schema.CONTEXT, schema.FEATURES):
                    rec[f"{prefix}_{f}"] = side[f]
                rec[f"{prefix}_{schema.CAPTIONS}"] = sets[key][schema.CAPTIONS]
            if problem:
                yield Outcome(job[schema.REC_KEY], error=problem[0], message=problem[1])
            else:
                yield Outcome(job[schema.REC_KEY], record=rec)

    report = store.run(jobs, process, shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                       retry_errors=ctx.retry_errors)
    report.extra["mirrored_pairs_dropped"] = mirrored
    return report


def card_section(out_dir: Any) -> dict:
    """Caption sets made and failed, caption rejections by reason, twin pairs by country pair and category."""
    root = Path(out_dir) / NAME
    sets = up.current_records(root / SETS, "caption_sets")
    set_errors = up.error_reasons(StageStore(root / SETS, "caption_sets"))
    rejected = sum((Counter(r[schema.REJECTED]) for r in sets), Counter())
    rounds = Counter(str(r[schema.ROUNDS]) for r in sets)
    pairs = up.current_records(root, NAME)
    pair_errors = up.error_reasons(StageStore(root, NAME))
    by_pair = Counter(" / ".join(sorted((p[schema.POS_COUNTRY] or "?", p[schema.NEG_COUNTRY] or "?"))) for p in pairs)
    by_cat = Counter(p[schema.CATEGORY] for p in pairs)
    data = {"caption_sets": len(sets), "caption_sets_failed": dict(set_errors),
            "captions_rejected_by_reason": dict(rejected), "requests_per_set": dict(rounds),
            "twin_pairs": len(pairs), "twin_pairs_failed": dict(pair_errors),
            "by_country_pair": dict(by_pair), "by_category": dict(by_cat)}
    md = (f"{len(sets)} caption sets complete, {sum(set_errors.values())} failed; {len(pairs)} twin pairs with "
          f"captions, {sum(pair_errors.values())} failed.\n\n**Rejected captions**\n\n" + up.counter_md(rejected)
          + "\n**Failed caption sets**\n\n" + up.counter_md(set_errors) + "\n**Requests per caption set**\n\n"
          + up.counter_md(rounds, ("requests", "sets")) + "\n**Twin pairs by country pair**\n\n"
          + up.counter_md(by_pair, ("countries", "pairs")) + "\n**Twin pairs by category**\n\n"
          + up.counter_md(by_cat, ("category", "pairs")))
    return {"title": "Captions", "markdown": md, "data": data}
