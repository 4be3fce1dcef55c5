"""Stage ``concepts``: cultural concepts with native name, country, category, context and visual features.

Three sources (config ``sources``), each a kind of job:

- ``top_down``: one LLM call per (country, category) cell asking for ``n_per_cell`` concepts; the
  record of a cell holds the accepted concepts and the rejected ones with their reasons.
- ``wiki``: one VLM call per Wikipedia page (WIT-style rows, deduplicated by page) with its title,
  descriptions and image, which decides whether the page is a cultural item and extracts its fields.
  An image that cannot be read, an unknown category or country is an error record with that reason.
- ``seed``: a JSONL file of concepts a user already has, taken as they are (validated, no call).

A category outside :class:`~cultureclip.curate.stages.upstream.Category` (or not enabled) is never mapped to
another one: the concept is rejected and the reason counted.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate.stages import settings as stage_settings
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.stages.settings import typed
from cultureclip.curate.stages.concepts_io import (WIKI_PROMPTS, check_concept, concept_entry, read_seed, read_wit,
                                                   wiki_request, wiki_responder)
from cultureclip.curate.prompts import load as load_prompt
from cultureclip.curate.runner import Job, Outcome, digest, run_stage

NAME = "concepts"
SOURCES = ("top_down", "wiki", "seed")
TOP_DOWN_PROMPTS = ("concepts_system", "concepts_top_down")  # prompt files; their text is in the keys


def _schemas():
    from pydantic import BaseModel  # the curate extra

    class ConceptItem(BaseModel):
        concept: str
        native_name: str
        category: str
        context: str
        features: list[str]

    class ConceptList(BaseModel):
        concepts: list[ConceptItem]

    return ConceptList


def top_down_messages(country: str, category: str, n: int) -> list[dict]:
    """The request for one (country, category) cell, built from that cell alone."""
    cats = ", ".join(c.value for c in up.Category)
    user = (load_prompt("concepts_top_down").format(n=n, categories=cats) + "\n\n"
            + up.field_block({"Country": country, "Category": category, "Count": n}))
    return up.system_user(load_prompt("concepts_system"), user)


def _cell_record(job: Mapping, answer: Any, allowed: tuple, model: str) -> dict:
    accepted, rejected, seen = [], [], set()
    for item in (answer.model_dump()[schema.CONCEPTS] if answer is not None else []):
        cat, reason = check_concept(item, allowed)
        if cat is not None and cat.value != job[schema.CATEGORY]:
            reason = f"category_mismatch: asked for {job[schema.CATEGORY]}, got {cat.value}"
        entry = concept_entry(item, job[schema.COUNTRY], cat, "top_down") if reason is None else None
        if entry is not None and up.normalize_name(entry[schema.CONCEPT]) in seen:
            reason = "duplicate_in_cell"
        elif entry is not None and len(accepted) >= job["n"]:
            reason = "over_count"
        if reason is not None:
            rejected.append({schema.CONCEPT: item.get(schema.CONCEPT), schema.CATEGORY: item.get(schema.CATEGORY),
                             schema.REASON: reason})
            continue
        seen.add(up.normalize_name(entry[schema.CONCEPT]))
        accepted.append(entry)
    return {schema.SOURCE: "top_down", schema.COUNTRY: job[schema.COUNTRY], schema.CATEGORY: job[schema.CATEGORY],
            schema.CONCEPTS: accepted, schema.REJECTED: rejected, schema.MODEL_ID: model}


def build_jobs(cfg: Mapping, model: str, wiki_model: str = "", countries: Sequence[str] = (),
               sampling: Optional[Mapping] = None, wiki_sampling: Optional[Mapping] = None) -> list[Job]:
    """Every job of the configured sources. The enabled categories are in every key (they decide what is
    accepted), and the country list in the wiki keys (it decides ``unknown_country``)."""
    sources = list(cfg.get("sources") or ["top_down"])
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"concepts.sources: unknown {bad}; the sources are {list(SOURCES)}")
    jobs: list[Job] = []
    allowed = up.categories_from(cfg.get("categories"))
    settings = {"categories": [c.value for c in allowed]}
    if "top_down" in sources:
        td = cfg.get("top_down") or {}
        n = int(td.get("n_per_cell", 1))
        for country in td.get("countries") or up.load_countries(td.get("countries_file")):
            for cat in allowed:
                jobs.append(Job(inputs={schema.SOURCE: "top_down", schema.COUNTRY: country, schema.CATEGORY: cat.value,
                                        "n": n}, model=model, prompts=TOP_DOWN_PROMPTS,
                            settings={**settings, "sampling": dict(sampling or {})}))
    if "wiki" in sources:
        wiki_settings = {**settings, "countries": digest(sorted(countries)), "sampling": dict(wiki_sampling or {})}
        for row in read_wit(cfg.get("wiki") or {}):
            inputs = {schema.SOURCE: "wiki", **{k: v for k, v in row.items() if k != schema.REC_WHERE},
                      "image_sha256": _file_sha256(row.get(schema.WIT_IMAGE_PATH))}  # the VLM reads the image
            jobs.append(Job(inputs=inputs,
                            model=wiki_model, prompts=WIKI_PROMPTS, settings=wiki_settings,
                            extra={schema.REC_WHERE: row[schema.REC_WHERE]}))
    if "seed" in sources:
        for item in read_seed((cfg.get("seed") or {}).get("file")):
            jobs.append(Job(inputs={schema.SOURCE: "seed", **{k: v for k, v in item.items() if k != schema.REC_WHERE}},
                            settings=settings, extra={schema.REC_WHERE: item[schema.REC_WHERE]}))
    return jobs


def _file_sha256(path: Optional[str]) -> Optional[str]:
    """The sha256 of a local file, or None (no path, or unreadable: the job says why when it runs)."""
    if not path:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _seed_outcome(job: Mapping, allowed: tuple) -> Outcome:
    cat, reason = check_concept(job, allowed)
    if reason is None and not str(job.get(schema.COUNTRY) or "").strip():
        reason = "no_country"
    if reason is not None:  # a rule on the item itself: the same item is always rejected, never asked again
        return Outcome(job[schema.REC_KEY], rejected=reason.split(":")[0],
                       message=f"{job[schema.REC_WHERE]}: {reason}")
    entry = concept_entry(job, str(job[schema.COUNTRY]).strip(), cat, "seed")
    return Outcome(job[schema.REC_KEY], record={schema.SOURCE: "seed", schema.REC_WHERE: job[schema.REC_WHERE],
                                                schema.CONCEPTS: [entry], schema.REJECTED: []})


def run(cfg: Mapping, ctx: Any):
    """Run the stage (see the module docstring) and return its report."""
    cfg = typed(stage_settings.Concepts, up.plain(cfg), NAME)
    allowed = up.categories_from(cfg.get("categories"))
    countries = up.load_countries((cfg.get("top_down") or {}).get("countries_file"))
    sources = list(cfg.get("sources") or ["top_down"])
    client, model, sampling = up.chat_client(cfg, ctx) if "top_down" in sources else (None, "", {})
    wiki_chat = {**(cfg.get("chat") or {}), **((cfg.get("wiki") or {}).get("chat") or {})}
    wiki_client, wiki_model, wiki_sampling = (up.chat_client({"chat": wiki_chat}, ctx) if "wiki" in sources
                                              else (None, "", {}))
    jobs = build_jobs(cfg, model, wiki_model, countries, sampling, wiki_sampling)
    known = set(countries)

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
        schema_cls = _schemas() if client is not None else None
        for chunk in up.chunked(todo, int(cfg.get("chunk", 256))):
            cells, pages, by_key = [], [], {}
            for job in chunk:
                by_key[job[schema.REC_KEY]] = job
                if job[schema.SOURCE] == "seed":
                    yield _seed_outcome(job, allowed)
                elif job[schema.SOURCE] == "top_down":
                    cells.append((job[schema.REC_KEY], top_down_messages(
                        job[schema.COUNTRY], job[schema.CATEGORY], job["n"]), schema_cls))
                else:
                    req, failure = wiki_request(job)
                    if failure is not None:
                        yield failure
                    else:
                        pages.append(req)
            for cl, reqs, mdl in ((client, cells, model), (wiki_client, pages, wiki_model)):
                for key, ans in (cl.ask_many(reqs) if reqs else ()):
                    yield _answer_outcome(by_key[key], ans, allowed, known, mdl)

    try:
        return run_stage(up.stage_store(ctx.out_dir, NAME), jobs, process, shard_index=ctx.shard_index,
                         num_shards=ctx.num_shards, retry_errors=ctx.retry_errors)
    finally:
        for cl in (client, wiki_client):
            if cl is not None:
                cl.close()


def _answer_outcome(job: Mapping, ans: Any, allowed: tuple, countries: set, model: str) -> Outcome:
    key = job[schema.REC_KEY]
    if ans.value is None:
        return Outcome(key, error=ans.error or "no_answer", message=ans.message, attempts=ans.attempts)
    if job[schema.SOURCE] == "top_down":
        return Outcome(key, record=_cell_record(job, ans.value, allowed, model), attempts=ans.attempts)
    from cultureclip.curate.stages.concepts_io import wiki_outcome
    return wiki_outcome(job, ans, allowed, countries, model)


def load_concepts(out_dir: Any, consumer: str = "dedup") -> list[dict]:
    """The accepted concepts of the current ``concepts`` view, sorted by concept id, each id once (of two
    current jobs giving the same concept, the one with the smaller key); refused while the view is incomplete."""
    store = up.stage_store(out_dir, NAME)
    store.require_complete(consumer)
    by_id: dict[str, dict] = {}
    for rec in sorted(store.records(), key=lambda r: r[schema.REC_KEY]):
        for entry in rec[schema.CONCEPTS]:
            by_id.setdefault(entry[schema.CONCEPT_ID], entry)
    return [by_id[k] for k in sorted(by_id)]


def card_section(out_dir: Any) -> dict:
    """Counts for the dataset card: jobs, accepted concepts, rejections and errors by reason."""
    store = up.stage_store(out_dir, NAME)
    status = store.status()
    records = list(store.records())
    rejected = Counter(r[schema.REASON].split(":")[0] for rec in records for r in rec[schema.REJECTED])
    rejected.update(status["rejected_by_reason"])  # whole items rejected by a rule (seed rows, wiki pages)
    errors = Counter(status["errors_by_reason"])
    by_id: dict[str, dict] = {}
    for rec in sorted(records, key=lambda r: r[schema.REC_KEY]):
        for entry in rec[schema.CONCEPTS]:
            by_id.setdefault(entry[schema.CONCEPT_ID], entry)
    concepts = list(by_id.values())
    by_cat = Counter(c[schema.CATEGORY] for c in concepts)
    by_source = Counter(c[schema.SOURCE] for c in concepts)
    proposed = (sum(len(rec[schema.CONCEPTS]) + len(rec[schema.REJECTED]) for rec in records)
                + status["rejected"] + status["errors"])
    data = {"jobs_done": len(records), "jobs_failed": status["errors"], "proposed": proposed,
            "accepted": len(concepts), "rejected_by_reason": up.counts(rejected), "errors_by_reason": up.counts(errors),
            "by_category": up.counts(by_cat), "by_source": up.counts(by_source),
            "countries": len({c[schema.COUNTRY] for c in concepts})}
    md = (f"{len(concepts)} concepts accepted from {proposed} proposed ({data['countries']} countries); "
          f"{len(records)} jobs done, {data['jobs_failed']} failed.\n\n**Rejected concepts**\n\n"
          + up.counter_md(rejected) + "\n**Failed jobs**\n\n" + up.counter_md(errors)
          + "\n**Accepted by category**\n\n" + up.counter_md(by_cat, ("category", "concepts")))
    return {"title": "Concepts", "markdown": md, "data": data}


def standin_responders() -> dict:
    """Deterministic stand-in answers for the demo and tests, read from the request text."""
    world = up.load_demo_world()

    def concept_list(request: Mapping) -> dict:
        fields = up.read_block(up.request_text(request))
        cell = world["concepts"].get(f"{fields.get('Country')}|{fields.get('Category')}", [])
        items = [{schema.CATEGORY: fields.get("Category"), **item} for item in cell]
        return {schema.CONCEPTS: items[:int(fields.get("Count", "0"))]}

    return {"ConceptList": concept_list, "WikiConcept": wiki_responder(world)}
