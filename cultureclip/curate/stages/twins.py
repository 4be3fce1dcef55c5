"""Stage ``twins``: verified cultural twins of every concept.

For each deduplicated concept (the *pos* side):

1. candidates: ``llm_candidates`` (K) proposed by the LLM, plus ``mined_candidates`` mined from our own
   concept pool: the nearest concepts by text embedding of their visual features, of the **same
   category and another country** (:func:`mine`, exact FAISS search per category);
2. rules, no call: a candidate of the same country, the same name, without a name, country or features
   is rejected with that reason; the same (name, country) proposed twice is asked about once;
3. a verifier call per candidate answers ``visually_similar``, ``culturally_distinct``, ``exists`` and a
   1-5 ``similarity`` with a reason; a candidate passes when all three are true and the similarity is
   at least ``min_similarity``;
4. the best ``keep`` (M) passing candidates (by similarity, then embedding similarity, then name) are
   the concept's twins; both sides keep their country, context and visual features.

A concept with no passing candidate gets a record with no twins (counted); a verifier call that
fails after its retries makes the concept's job an error (retried on the next run), never a pass.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Mapping, Optional

from cultureclip import schema
from cultureclip.curate.backends import embeddings as emb
from cultureclip.curate.stages import settings as stage_settings
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.stages.settings import typed
from cultureclip.curate.stages.dedup import load_deduped
from cultureclip.curate.runner import Job, Outcome, run_stage
from cultureclip.curate.stages.twins_prompts import (PROMPTS, TWIN_FIELDS, candidate_messages, schemas,  # noqa: F401
                                                     standin_responders, verdict_messages)

NAME = "twins"
__all__ = ["run", "mine", "load_twins", "card_section", "standin_responders"]


def mine_text(concept: Mapping) -> str:
    """What twin mining embeds: the concept's visual features (its name when it has none)."""
    return "; ".join(concept[schema.FEATURES]) or concept[schema.CONCEPT]


def mine(concepts: list[dict], feats: Any, k: int) -> dict[int, list[tuple[int, float]]]:
    """The ``k`` nearest concepts of each concept among those of the same category and another country.

    Exact: per category, a flat FAISS index is searched for ``k + n_own`` neighbours (``n_own``: the
    concepts of the query's own country in that category, itself included), so that after the
    same-country ones are dropped at least ``k`` remain whenever that many exist.
    """
    from cultureclip.eval.retrieval import build_index
    by_cat: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        by_cat.setdefault(c[schema.CATEGORY], []).append(i)
    out: dict[int, list[tuple[int, float]]] = {}
    for rows in by_cat.values():
        own = Counter(concepts[r][schema.COUNTRY] for r in rows)
        index = build_index(feats[rows], kind="flat", use_gpu=False)
        for country in sorted(own):  # one batched search per (category, country)
            queries = [r for r in rows if concepts[r][schema.COUNTRY] == country]
            scores, idx = index.search(feats[queries], min(len(rows), k + own[country]))  # [q, kq]
            for qi, r in enumerate(queries):
                found = [(rows[j], float(s)) for s, j in zip(scores[qi].tolist(), idx[qi].tolist())
                         if concepts[rows[j]][schema.COUNTRY] != country]
                out[r] = found[:k]
    return out


def _side(c: Mapping) -> dict:
    return {f: c.get(f) for f in TWIN_FIELDS}


def build_jobs(pool: list[dict], cfg: Mapping, model: str, sampling: Optional[Mapping] = None) -> list[Job]:
    """One job per concept, with its mined candidates (pool indices are resolved to concepts here): a job's
    inputs are the concept's fields and its candidates' fields, so an edit reruns the jobs that read it."""
    k_mined = int(cfg.get("mined_candidates", 3))
    mined: dict[int, list[tuple[int, float]]] = {i: [] for i in range(len(pool))}
    if k_mined > 0 and len(pool) > 1:
        feats = emb.embed([mine_text(c) for c in pool], cfg.get("embedding") or {}, desc="twins: embedding the pool")
        mined = mine(pool, feats, k_mined)
    settings = {"keep": int(cfg.get("keep", 2)), "min_similarity": int(cfg.get("min_similarity", 3)),
                "sampling": dict(sampling or {})}
    jobs = []
    for i, c in enumerate(pool):
        cands = [{**_side(pool[j]), schema.SOURCE: "mined", schema.SIMILARITY: round(s, 4)} for j, s in mined[i]]
        jobs.append(Job(inputs={"pos": _side(c), "mined": cands, "k": int(cfg.get("llm_candidates", 3)),
                                "pos_id": c[schema.CONCEPT_ID]}, model=model, prompts=PROMPTS, settings=settings))
    return jobs


def rule_reason(pos: Mapping, cand: Mapping) -> Optional[str]:
    """Why a candidate is rejected without asking the verifier (None: ask)."""
    if not str(cand.get(schema.CONCEPT) or "").strip() or not str(cand.get(schema.COUNTRY) or "").strip():
        return "incomplete_candidate"
    if up.normalize_name(cand[schema.COUNTRY]) == up.normalize_name(pos[schema.COUNTRY]):
        return "same_country"
    if up.normalize_name(cand[schema.CONCEPT]) == up.normalize_name(pos[schema.CONCEPT]):
        return "same_concept"
    if not [f for f in cand.get(schema.FEATURES) or [] if str(f).strip()]:
        return "no_features"
    return None


def _candidates(job: Mapping, llm_value: Any) -> tuple[list[dict], list[dict]]:
    """The candidates to verify and those rejected by rule, LLM ones first, each (name, country) once."""
    pos = job["pos"]
    llm = [{**_side({**c, schema.CATEGORY: pos[schema.CATEGORY]}), schema.SOURCE: "llm", schema.SIMILARITY: None}
           for c in (llm_value.model_dump()[schema.TWINS] if llm_value is not None else [])]
    ask, rejected, seen = [], [], {}
    for cand in llm[:job["k"]] + [dict(c) for c in job["mined"]]:  # copies: the job stays as built
        cand[schema.FEATURES] = [f.strip() for f in cand.get(schema.FEATURES) or [] if str(f).strip()]
        ident = (up.normalize_name(cand.get(schema.CONCEPT) or ""), up.normalize_name(cand.get(schema.COUNTRY) or ""))
        if ident in seen:
            seen[ident][schema.SOURCE] = "llm+mined"
            if cand[schema.SIMILARITY] is not None:
                seen[ident][schema.SIMILARITY] = cand[schema.SIMILARITY]
            continue
        reason = rule_reason(pos, cand)
        if reason:
            rejected.append({**_brief(cand), schema.REASON: reason})
        else:
            seen[ident] = cand
            ask.append(cand)
    return ask, rejected



def _brief(cand: Mapping) -> dict:
    return {schema.CONCEPT: cand.get(schema.CONCEPT), schema.COUNTRY: cand.get(schema.COUNTRY),
            schema.SOURCE: cand.get(schema.SOURCE)}


def _verdict_reason(v: Mapping, min_similarity: int) -> Optional[str]:
    for q in (schema.EXISTS, schema.CULTURALLY_DISTINCT, schema.VISUALLY_SIMILAR):
        if not v[q]:
            return f"not_{q}"
    if v[schema.SIMILARITY] < min_similarity:
        return "low_similarity"
    return None


def run(cfg: Mapping, ctx: Any):
    """Run the stage over the ``dedup`` store; return its report."""
    cfg = typed(stage_settings.Twins, up.plain(cfg), NAME)
    pool = load_deduped(ctx.out_dir, NAME)
    client, model, sampling = up.chat_client(cfg, ctx)
    jobs = build_jobs(pool, cfg, model, sampling)
    keep, min_sim = int(cfg.get("keep", 2)), int(cfg.get("min_similarity", 3))

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        cand_schema, verdict_schema = schemas()
        for chunk in up.chunked(todo, int(cfg.get("chunk", 64))):
            by_key = {j[schema.REC_KEY]: j for j in chunk}
            asks = [(k, candidate_messages(j["pos"], j["k"]), cand_schema) for k, j in by_key.items() if j["k"] > 0]
            llm = dict(client.ask_many(asks))
            state, verify = {}, []
            for key, job in by_key.items():
                ans = llm.get(key)
                if ans is not None and ans.value is None:
                    yield Outcome(key, error=f"candidates_{ans.error}", message=ans.message, attempts=ans.attempts)
                    continue
                ask, rejected = _candidates(job, ans.value if ans is not None else None)
                state[key] = (ask, rejected)
                verify += [((key, i), verdict_messages(job["pos"], c), verdict_schema) for i, c in enumerate(ask)]
            verdicts = dict(client.ask_many(verify))
            for key, (ask, rejected) in state.items():
                failed = [verdicts[(key, i)] for i in range(len(ask)) if verdicts[(key, i)].value is None]
                if failed:
                    yield Outcome(key, error=f"verifier_{failed[0].error}", attempts=failed[0].attempts,
                                  message=f"{len(failed)} of {len(ask)} verifier calls failed: {failed[0].message}")
                    continue
                yield Outcome(key, record=_record(by_key[key], ask, rejected, verdicts, keep, min_sim, model))

    try:
        return run_stage(up.stage_store(ctx.out_dir, NAME), jobs, process, shard_index=ctx.shard_index,
                         num_shards=ctx.num_shards, retry_errors=ctx.retry_errors,
                         upstream=(up.stage_store(ctx.out_dir, "dedup"),))
    finally:
        client.close()


def _record(job, ask, rejected, verdicts, keep, min_sim, model) -> dict:
    passed = []
    for i, cand in enumerate(ask):
        v = verdicts[(job[schema.REC_KEY], i)].value.model_dump()
        reason = _verdict_reason(v, min_sim)
        if reason:
            rejected.append({**_brief(cand), schema.REASON: reason, schema.VERIFIER_REASON: v[schema.REASON]})
        else:
            passed.append({**cand, schema.VERIFIER_SIMILARITY: v[schema.SIMILARITY], schema.REASON: v[schema.REASON]})
    passed.sort(key=lambda c: (-c[schema.VERIFIER_SIMILARITY], -(c[schema.SIMILARITY] or 0.0),
                               up.normalize_name(c[schema.CONCEPT]), c[schema.COUNTRY]))
    rejected += [{**_brief(c), schema.REASON: "not_in_best_m"} for c in passed[keep:]]
    return {**job["pos"], schema.CONCEPT_ID: job["pos_id"], schema.TWINS: passed[:keep], schema.REJECTED: rejected,
            schema.VERIFIED: len(passed), schema.MODEL_ID: model}


def load_twins(out_dir: Any, consumer: str = "captions") -> list[dict]:
    """The twins records of the current view, sorted by the pos concept id (refused while incomplete)."""
    return up.load_current(out_dir, NAME, consumer, upstream=("dedup",))


def card_section(out_dir: Any) -> dict:
    """Candidates proposed, rejected (by reason) and verified; kept twins by country pair and category."""
    store = up.stage_store(out_dir, NAME)
    recs = sorted(store.records(), key=lambda r: r[schema.CONCEPT_ID])
    errors = Counter(store.status()["errors_by_reason"])
    rejected = Counter(r[schema.REASON] for rec in recs for r in rec[schema.REJECTED])
    sources = Counter(t[schema.SOURCE] for rec in recs for t in rec[schema.TWINS])
    kept = [(rec, t) for rec in recs for t in rec[schema.TWINS]]
    pairs = Counter(" / ".join(sorted((rec[schema.COUNTRY], t[schema.COUNTRY]))) for rec, t in kept)
    cats = Counter(rec[schema.CATEGORY] for rec, _ in kept)
    verified = sum(rec[schema.VERIFIED] for rec in recs)
    proposed = verified + sum(v for k, v in rejected.items() if k != "not_in_best_m")
    data = {"concepts": len(recs), "concepts_failed": sum(errors.values()), "errors_by_reason": up.counts(errors),
            "candidates": proposed, schema.VERIFIED: verified, "kept": len(kept),
            "concepts_without_twin": sum(1 for rec in recs if not rec[schema.TWINS]),
            "rejected_by_reason": up.counts(rejected), "kept_by_source": up.counts(sources),
            "by_country_pair": up.counts(pairs), "by_category": up.counts(cats)}
    md = (f"{proposed} twin candidates for {len(recs)} concepts; {verified} verified, {len(kept)} kept; "
          f"{data['concepts_without_twin']} concepts without a twin; {data['concepts_failed']} concepts failed.\n\n"
          "**Rejected candidates**\n\n" + up.counter_md(rejected) + "\n**Failed concepts**\n\n" + up.counter_md(errors)
          + "\n**Kept twins by source**\n\n" + up.counter_md(sources, ("source", "twins"))
          + "\n**Kept twins by country pair**\n\n" + up.counter_md(pairs, ("countries", "twins"))
          + "\n**Kept twins by category**\n\n" + up.counter_md(cats, ("category", "twins")))
    return {"title": "Cultural twins", "markdown": md, "data": data}
