"""Stage ``dedup``: merge concepts that are the same item of the same country and category.

Two concepts merge when, within the same (category, country):

1. their normalised names are equal (casefold, NFKC, no diacritics or punctuation: "Phở" = "Pho"),
   or their normalised native names are; or
2. their text embeddings (:mod:`cultureclip.curate.backends.embeddings`) are nearest neighbours with a cosine
   similarity of at least ``threshold`` (FAISS flat inner-product index, ``neighbours`` per concept).

Merges are transitive (union-find). Concepts of different countries never merge: two countries'
similar items are twin material, not duplicates. A merged concept keeps the member with the most
visual features (then the smallest concept id), the union of all members' features, and the list of
merged members with the similarity and reason of each merge (the report and the card list them).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator, Mapping

from cultureclip import schema
from cultureclip.curate.backends import embeddings as emb
from cultureclip.curate.stages import settings as stage_settings
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.stages.settings import typed
from cultureclip.curate.stages.concepts import load_concepts
from cultureclip.curate.runner import Job, Outcome, run_stage

NAME = "dedup"
THRESHOLD = stage_settings.Dedup.threshold  # default cosine for merging (see docs/curation_upstream.md)


def embed_text(concept: Mapping, mode: str) -> str:
    """The text embedded for a concept: its name (``name``) or name and context (``name_context``)."""
    if mode == "name":
        return concept[schema.CONCEPT]
    if mode == "name_context":
        return f"{concept[schema.CONCEPT]}: {concept.get(schema.CONTEXT) or ''}"
    raise ValueError(f"dedup.text must be 'name' or 'name_context', got {mode!r}")


def find_merges(concepts: list[dict], cfg: Mapping) -> tuple[list[list[int]], list[list[dict]]]:
    """Clusters of concept indices (each sorted, clusters by first index) and each cluster's merge edges."""
    parent = list(range(len(concepts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges: list[dict] = []  # one per union: the later concept merged with the earlier one

    def union(i: int, j: int, sim: float, reason: str) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
            lo, hi = concepts[min(i, j)], concepts[max(i, j)]
            edges.append({schema.CONCEPT_ID: hi[schema.CONCEPT_ID], schema.CONCEPT: hi[schema.CONCEPT],
                          schema.MERGED_WITH: lo[schema.CONCEPT], schema.COUNTRY: hi[schema.COUNTRY],
                          schema.CATEGORY: hi[schema.CATEGORY], schema.SIMILARITY: round(sim, 4),
                          schema.REASON: reason, "_ids": (lo[schema.CONCEPT_ID], hi[schema.CONCEPT_ID])})

    group = [(c[schema.CATEGORY], c[schema.COUNTRY]) for c in concepts]
    for field, reason in ((schema.CONCEPT, "same_name"), (schema.NATIVE_NAME, "same_native_name")):
        first: dict[tuple, int] = {}
        for i, c in enumerate(concepts):
            name = up.normalize_name(c.get(field) or "")
            if name:
                j = first.setdefault((group[i], name), i)
                if j != i:
                    union(j, i, 1.0, reason)
    if len(concepts) > 1:
        feats = emb.embed([embed_text(c, cfg.get("text", "name")) for c in concepts], cfg.get("embedding") or {},
                          desc="dedup: embedding concepts")
        threshold = float(cfg.get("threshold", THRESHOLD))
        for i, nbrs in sorted(emb.search_groups(feats, group, int(cfg.get("neighbours", 10))).items()):
            for j, sim in nbrs:
                if sim >= threshold:
                    union(i, j, sim, "embedding")
    clusters: dict[int, list[int]] = {}
    for i in range(len(concepts)):
        clusters.setdefault(find(i), []).append(i)
    by_root: dict[int, list[dict]] = {}  # each edge to its cluster once: O(edges), not O(clusters x edges)
    index = {c[schema.CONCEPT_ID]: i for i, c in enumerate(concepts)}
    for e in edges:
        by_root.setdefault(find(index[e["_ids"][0]]), []).append({k: v for k, v in e.items() if k != "_ids"})
    roots = sorted(clusters)
    return [clusters[r] for r in roots], [by_root.get(r, []) for r in roots]


def merged_record(members: list[dict], edges: list[dict]) -> dict:
    """The concept a cluster becomes (see the module docstring); ``edges`` are the cluster's own merges."""
    keep = sorted(members, key=lambda c: (-len(c[schema.FEATURES]), c[schema.CONCEPT_ID]))[0]
    features, seen = [], set()
    for c in [keep] + [m for m in members if m is not keep]:
        for f in c[schema.FEATURES]:
            if up.normalize_name(f) not in seen:
                seen.add(up.normalize_name(f))
                features.append(f)
    return {**keep, schema.FEATURES: features, schema.MERGED: list(edges)}


def run(cfg: Mapping, ctx: Any):
    """Run the stage over the current ``concepts`` view; return its report (``extra.merged`` lists the merges).

    One job per cluster; its inputs are the members' full entries and the cluster's merges, so an edit of
    any member (its features, say) reruns exactly that cluster's job.
    """
    cfg = typed(stage_settings.Dedup, up.plain(cfg), NAME)
    if ctx.num_shards > 1:
        raise ValueError(f"dedup compares every concept with every other: run stage=dedup once, with num_shards=1 "
                         f"(got num_shards={ctx.num_shards}), after every job range of stage=concepts")
    concepts = load_concepts(ctx.out_dir, NAME)
    if not concepts:
        raise ValueError(f"{ctx.stage_dir('concepts')} holds no accepted concepts: run stage=concepts first")
    clusters, edges = find_merges(concepts, cfg)
    settings = {"embedding": emb.embedding_id(cfg.get("embedding") or {}),
                "threshold": float(cfg.get("threshold", THRESHOLD)),
                "neighbours": int(cfg.get("neighbours", 10)), "text": cfg.get("text", "name")}
    jobs = [Job(inputs={"members": [concepts[i] for i in members], "edges": cluster_edges}, settings=settings)
            for members, cluster_edges in zip(clusters, edges)]

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        for job in todo:
            yield Outcome(job[schema.REC_KEY], record=merged_record(job["members"], job["edges"]))

    report = run_stage(up.stage_store(ctx.out_dir, NAME), jobs, process, shard_index=ctx.shard_index,
                       num_shards=ctx.num_shards, retry_errors=ctx.retry_errors,
                       upstream=(up.stage_store(ctx.out_dir, "concepts"),))
    report.extra[schema.MERGED] = [e for cluster_edges in edges for e in cluster_edges]
    return report


def load_deduped(out_dir: Any, consumer: str = "twins") -> list[dict]:
    """The deduplicated concepts of the current view, sorted by concept id (refused while incomplete or out of date)."""
    return up.load_current(out_dir, NAME, consumer, upstream=("concepts",))


def card_section(out_dir: Any) -> dict:
    """The merges for the dataset card."""
    recs = sorted(up.stage_store(out_dir, NAME).records(), key=lambda r: r[schema.CONCEPT_ID])
    merges = [m for r in recs for m in r[schema.MERGED]]
    by_reason = Counter(m[schema.REASON] for m in merges)
    lines = [f"| {r[schema.CONCEPT]} | {m[schema.CONCEPT]} ~ {m[schema.MERGED_WITH]} | "
             f"{r[schema.COUNTRY]} | {r[schema.CATEGORY]} | {m[schema.REASON]} | {m[schema.SIMILARITY]:.3f} |"
             for r in recs for m in r[schema.MERGED]]
    md = (f"{len(recs)} concepts after merging {len(merges)} duplicates.\n\n"
          + up.counter_md(by_reason, ("merge reason", "merges"))
          + ("\n| kept | merged pair | country | category | reason | similarity |\n|---|---|---|---|---|---:|\n"
             + "\n".join(lines) + "\n" if lines else ""))
    return {"title": "Deduplication", "markdown": md,
            "data": {"concepts": len(recs), "merges": merges, "merges_by_reason": up.counts(by_reason)}}


def standin_responders() -> dict:
    """dedup makes no chat calls."""
    return {}
