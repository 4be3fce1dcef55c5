"""Stage ``concepts``: cultural concepts with native name, country, category, context and visual features.

Three sources (config ``sources``), each a kind of job:

- ``top_down``: one LLM call per (country, category) cell asking for ``n_per_cell`` concepts; the
  record of a cell holds the accepted concepts and the rejected ones with their reasons.
- ``wiki``: one VLM call per Wikipedia page (WIT-style rows, deduplicated by page) with its title,
  descriptions and image, which decides whether the page is a cultural item and extracts its fields.
  An image that cannot be read, an unknown category or country is an error record with that reason.
- ``seed``: a JSONL file of concepts a user already has, taken as they are (validated, no call).

A category outside :class:`~cultureclip.curate.upstream.Category` (or not enabled) is never mapped to
another one: the concept is rejected and the reason counted.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from cultureclip import schema
from cultureclip.curate import upstream as up
from cultureclip.curate.chat import effective_chat
from cultureclip.curate.concepts_io import read_seed, read_wit, wiki_request, wiki_responder
from cultureclip.curate.records import Outcome, StageStore, record_key

NAME = "concepts"
PROMPT_VERSION = "concepts-v1"
SOURCES = ("top_down", "wiki", "seed")
SYSTEM = ("You are an expert on the cultures of the world. You answer only with facts you are sure of "
          "and reply in the requested JSON format.")


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
    user = (f"List {n} distinct, well-known cultural concepts of the category below from the country below, each "
            f"easy to recognise in a picture. For each give: concept (its common English name), native_name (its "
            f"name in the local language and script), category (exactly one of: {cats}), context (one sentence "
            f"on what it is and where it comes from) and features (3 to 5 key visual features, short noun "
            f"phrases).\n\n" + up.field_block({"Country": country, "Category": category, "Count": n}))
    return up.system_user(SYSTEM, user)


def concept_entry(item: Mapping, country: str, category: up.Category, source: str) -> dict:
    """A concept as the stage stores it (stripped texts, empty features dropped)."""
    name = str(item.get(schema.CONCEPT) or "").strip()
    return {schema.CONCEPT_ID: up.concept_id(name, country, category.value), schema.CONCEPT: name,
            schema.NATIVE_NAME: str(item.get(schema.NATIVE_NAME) or "").strip() or None,
            schema.COUNTRY: country, schema.CATEGORY: category.value,
            schema.CONTEXT: str(item.get(schema.CONTEXT) or "").strip() or None,
            schema.FEATURES: [f.strip() for f in item.get(schema.FEATURES) or [] if str(f).strip()],
            schema.SOURCE: source}


def check_concept(item: Mapping, allowed: tuple) -> tuple[Optional[up.Category], Optional[str]]:
    """The concept's category, or None and the reason it is rejected."""
    try:
        cat = up.parse_category(item.get(schema.CATEGORY), allowed)
    except up.CategoryNotEnabled as exc:
        return None, f"category_not_enabled: {exc}"
    except up.UnknownCategory as exc:
        return None, f"unknown_category: {exc}"
    if not str(item.get(schema.CONCEPT) or "").strip():
        return None, "empty_name"
    if not [f for f in item.get(schema.FEATURES) or [] if str(f).strip()]:
        return None, "no_features"
    return cat, None


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
            schema.CONCEPTS: accepted, schema.REJECTED: rejected, schema.MODEL_ID: model,
            schema.PROMPT_VERSION: PROMPT_VERSION}


def build_jobs(cfg: Mapping, model: str, wiki_model: str = "") -> list[dict]:
    """Every job of the configured sources (each with its ``key``)."""
    sources = list(cfg.get("sources") or ["top_down"])
    bad = [s for s in sources if s not in SOURCES]
    if bad:
        raise ValueError(f"concepts.sources: unknown {bad}; the sources are {list(SOURCES)}")
    jobs: list[dict] = []
    allowed = up.categories_from(cfg.get("categories"))
    if "top_down" in sources:
        td = cfg.get("top_down") or {}
        countries = td.get("countries") or up.load_countries(td.get("countries_file"))
        n = int(td.get("n_per_cell", 1))
        for country in countries:
            for cat in allowed:
                inputs = {schema.SOURCE: "top_down", schema.COUNTRY: country, schema.CATEGORY: cat.value, "n": n}
                jobs.append({**inputs, schema.REC_KEY: record_key(NAME, inputs, model, PROMPT_VERSION)})
    if "wiki" in sources:
        for row in read_wit(cfg.get("wiki") or {}):
            inputs = {schema.SOURCE: "wiki", **{k: v for k, v in row.items() if k != schema.REC_WHERE}}
            jobs.append({**row, schema.SOURCE: "wiki",
                         schema.REC_KEY: record_key(NAME, inputs, wiki_model, PROMPT_VERSION)})
    if "seed" in sources:
        for item in read_seed((cfg.get("seed") or {}).get("file")):
            inputs = {schema.SOURCE: "seed", **{k: v for k, v in item.items() if k != schema.REC_WHERE}}
            jobs.append({**item, schema.SOURCE: "seed", schema.REC_KEY: record_key(NAME, inputs)})
    return jobs


def _seed_outcome(job: Mapping, allowed: tuple) -> Outcome:
    cat, reason = check_concept(job, allowed)
    if reason is None and not str(job.get(schema.COUNTRY) or "").strip():
        reason = "no_country"
    if reason is not None:
        return Outcome(job[schema.REC_KEY], error=reason.split(":")[0],
                       message=f"{job[schema.REC_WHERE]}: {reason}")
    entry = concept_entry(job, str(job[schema.COUNTRY]).strip(), cat, "seed")
    return Outcome(job[schema.REC_KEY], record={schema.SOURCE: "seed", schema.REC_WHERE: job[schema.REC_WHERE],
                                                schema.CONCEPTS: [entry], schema.REJECTED: []})


def run(cfg: Mapping, ctx: Any):
    """Run the stage (see the module docstring) and return its report."""
    cfg = up.plain(cfg)
    allowed = up.categories_from(cfg.get("categories"))
    countries = set(up.load_countries((cfg.get("top_down") or {}).get("countries_file")))
    sources = list(cfg.get("sources") or ["top_down"])
    client, model = up.chat_client(cfg, ctx) if "top_down" in sources else (None, "")
    wiki_chat = {**(cfg.get("chat") or {}), **((cfg.get("wiki") or {}).get("chat") or {})}
    wiki_client, wiki_model = up.chat_client({"chat": wiki_chat}, ctx) if "wiki" in sources else (None, "")
    jobs = build_jobs(cfg, model, wiki_model)
    # the models of both sources whether used now or not, so that adding a source later to the same folder works
    run_chat = up.plain(getattr(ctx, "chat", None) or {})
    settings = {"model": effective_chat(cfg.get("chat"), run_chat).get("model"),
                "wiki_model": effective_chat(wiki_chat, run_chat).get("model"),
                "prompt_version": PROMPT_VERSION, "categories": [c.value for c in allowed]}
    store = StageStore(ctx.stage_dir(NAME), NAME, settings)
    schema_cls = _schemas() if client is not None else None

    def process(todo: Iterator[Mapping]) -> Iterator[Outcome]:
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
                    yield _answer_outcome(by_key[key], ans, allowed, countries, mdl)

    try:
        return store.run(jobs, process, shard_index=ctx.shard_index, num_shards=ctx.num_shards,
                         retry_errors=ctx.retry_errors)
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
    from cultureclip.curate.concepts_io import wiki_outcome
    return wiki_outcome(job, ans, allowed, countries, model, PROMPT_VERSION)


def load_concepts(out_dir: Any) -> list[dict]:
    """The accepted concepts of the ``concepts`` store, sorted by concept id, each id once."""
    store = StageStore(Path(out_dir) / NAME, NAME)
    by_id: dict[str, dict] = {}
    for rec in store.records():
        for entry in rec[schema.CONCEPTS]:
            by_id.setdefault(entry[schema.CONCEPT_ID], entry)
    return [by_id[k] for k in sorted(by_id)]


def card_section(out_dir: Any) -> dict:
    """Counts for the dataset card: jobs, accepted concepts, rejections and errors by reason."""
    store = StageStore(Path(out_dir) / NAME, NAME)
    records = store.records()
    rejected = Counter(r[schema.REASON].split(":")[0] for rec in records for r in rec[schema.REJECTED])
    errors = up.error_reasons(store)
    concepts = load_concepts(out_dir)
    by_cat = Counter(c[schema.CATEGORY] for c in concepts)
    by_source = Counter(c[schema.SOURCE] for c in concepts)
    proposed = sum(len(rec[schema.CONCEPTS]) + len(rec[schema.REJECTED]) for rec in records) + sum(errors.values())
    data = {"jobs_done": len(records), "jobs_failed": sum(errors.values()), "proposed": proposed,
            "accepted": len(concepts), "rejected_by_reason": dict(rejected), "errors_by_reason": dict(errors),
            "by_category": dict(by_cat), "by_source": dict(by_source),
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
