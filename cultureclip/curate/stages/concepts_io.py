"""Inputs of the ``concepts`` stage: WIT-style Wikipedia rows, a concept seed file, and the per-page VLM call.

WIT rows (``page_title``, ``section_title``, ``caption_reference_description``,
``context_page_description``, ``context_section_description``, ``image_url``, and our ``image_path``
for a downloaded image) come from local JSONL/JSON/parquet files or a ``datasets`` name, and are
deduplicated by page (``page_url``, else ``page_title``): the first row of a page is kept.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from cultureclip import schema
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.prompts import load as load_prompt
from cultureclip.curate.runner import Outcome

WIT_FIELDS = (schema.WIT_PAGE_URL, schema.WIT_PAGE_TITLE, schema.WIT_SECTION_TITLE,
              schema.WIT_REFERENCE_DESCRIPTION, schema.WIT_PAGE_DESCRIPTION, schema.WIT_SECTION_DESCRIPTION,
              schema.WIT_IMAGE_URL, schema.WIT_IMAGE_PATH)
SEED_FIELDS = (schema.CONCEPT, schema.NATIVE_NAME, schema.COUNTRY, schema.CATEGORY, schema.CONTEXT, schema.FEATURES)
WIKI_PROMPTS = ("concepts_wiki_system", "concepts_wiki")  # prompt files; their text is in the keys
PACKAGE = "package:"  # seed.file prefix: a file of cultureclip/data_files
DESCRIPTION_CHARS = 1500  # a page description is cut here: the lead paragraph says what the item is


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


def _rows_of(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:row {i}", row
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: a JSON file of WIT rows must hold a list of objects")
        for i, row in enumerate(data, 1):
            yield f"{path}:item {i}", row
    else:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{i}", json.loads(line)
                    except ValueError as exc:
                        raise ValueError(f"{path}:{i}: not a JSON object: {exc}") from exc


def read_wit(cfg: Mapping) -> list[dict]:
    """WIT-style rows from ``cfg.files`` and/or ``cfg.dataset`` (a ``datasets`` name, ``cfg.split``, and
    ``cfg.data_files`` for the generic loaders such as ``json`` and ``parquet``),
    one per page, at most ``cfg.limit`` pages; relative ``image_path`` resolves against the row's file.

    Raises:
        ValueError: a row that is not an object or has no ``page_title`` (naming file and line).
    """
    sources: list = [(Path(p), None) for p in cfg.get("files") or []]
    if cfg.get("dataset"):
        sources.append((None, cfg["dataset"]))
    limit = cfg.get("limit")
    rows, pages = [], set()
    for path, dataset in sources:
        if dataset is not None:
            try:
                import datasets
            except ImportError as exc:  # pragma: no cover
                raise ImportError("wiki.dataset needs the datasets package: pip install 'cultureclip[curate]'") from exc
            kwargs = {"data_files": cfg["data_files"]} if cfg.get("data_files") else {}
            stream = ((f"{dataset}[{i}]", r) for i, r in enumerate(datasets.load_dataset(
                dataset, split=cfg.get("split", "train"), streaming=True, **kwargs)))
        else:
            stream = _rows_of(path)
        for where, row in stream:
            if not isinstance(row, Mapping) or not str(row.get(schema.WIT_PAGE_TITLE) or "").strip():
                raise ValueError(f"{where}: a WIT row needs a non-empty {schema.WIT_PAGE_TITLE!r}")
            page = row.get(schema.WIT_PAGE_URL) or row[schema.WIT_PAGE_TITLE]
            if page in pages:
                continue
            pages.add(page)
            out = {k: (str(row[k]) if row.get(k) is not None else None) for k in WIT_FIELDS}
            if out[schema.WIT_IMAGE_PATH] and path is not None and not Path(out[schema.WIT_IMAGE_PATH]).is_absolute():
                out[schema.WIT_IMAGE_PATH] = str(path.parent / out[schema.WIT_IMAGE_PATH])
            rows.append({**out, schema.REC_WHERE: where})
            if limit is not None and len(rows) >= int(limit):
                return rows
    return rows


def read_seed(path: Optional[str]) -> list[dict]:
    """Concepts from a JSONL seed file (fields concept, native_name, country, category, context, features);
    ``package:NAME`` names a file shipped in ``cultureclip/data_files``.

    Raises:
        ValueError: no file given, a line that is not a JSON object, or features that are not a list.
    """
    if not path:
        raise ValueError("concepts.sources has 'seed' but concepts.seed.file is not set")
    if str(path).startswith(PACKAGE):  # a file shipped with the package (the demo's seed list)
        from importlib import resources
        path = str(resources.files("cultureclip").joinpath("data_files", str(path)[len(PACKAGE):]))
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{i}: not a JSON object: {exc}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{i}: not a JSON object")
            if not isinstance(obj.get(schema.FEATURES, []), list):
                raise ValueError(f"{path}:{i}: {schema.FEATURES!r} must be a list of strings")
            items.append({**{k: obj.get(k) for k in SEED_FIELDS}, schema.REC_WHERE: f"{path}:{i}"})
    return items


def _schema():
    from pydantic import BaseModel

    class WikiConcept(BaseModel):
        cultural: bool
        concept: str
        native_name: str
        country: str
        category: str
        context: str
        features: list[str]
        reason: str

    return WikiConcept


def wiki_messages(job: Mapping, image: dict) -> list[dict]:
    """The request for one page: its own title, descriptions and image."""
    cats = ", ".join(c.value for c in up.Category)
    desc = (job.get(schema.WIT_PAGE_DESCRIPTION) or "")[:DESCRIPTION_CHARS]
    text = (load_prompt("concepts_wiki").format(categories=cats) + "\n\n" + up.field_block({
                "Title": job.get(schema.WIT_PAGE_TITLE), "Section": job.get(schema.WIT_SECTION_TITLE) or "",
                "Image description": job.get(schema.WIT_REFERENCE_DESCRIPTION) or "",
                "Section description": job.get(schema.WIT_SECTION_DESCRIPTION) or "", "Page description": desc}))
    return up.system_user(load_prompt("concepts_wiki_system"), [{"type": "text", "text": text}, image])


def wiki_request(job: Mapping) -> tuple[Optional[tuple], Optional[Outcome]]:
    """``((key, messages, schema), None)``, or ``(None, error outcome)`` when the page's image is unusable."""
    from cultureclip.curate.backends.chat import image_part
    key, path, url = job[schema.REC_KEY], job.get(schema.WIT_IMAGE_PATH), job.get(schema.WIT_IMAGE_URL)
    if path:
        try:
            from PIL import Image
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
                mime = Image.MIME.get(im.format)
        except Exception as exc:  # this page's rejection, never a silent drop; the file's hash is in the key,
            return None, Outcome(key, rejected="unreadable_image",  # so a repaired file is a new job
                                 message=f"{job[schema.REC_WHERE]}: image {path}: {type(exc).__name__}: {exc}")
        image = image_part(data, mime)
    elif url:
        image = {"type": "image_url", "image_url": {"url": url}}  # the server fetches it
    else:
        return None, Outcome(key, rejected="no_image", message=f"{job[schema.REC_WHERE]}: neither "
                                                            f"{schema.WIT_IMAGE_PATH} nor {schema.WIT_IMAGE_URL}")
    return (key, wiki_messages(job, image), _schema()), None


def wiki_outcome(job: Mapping, ans: Any, allowed: tuple, countries: set, model: str) -> Outcome:
    """The record (or error) of one page from the VLM's answer."""
    key, value = job[schema.REC_KEY], ans.value.model_dump()
    base = {schema.SOURCE: "wiki", schema.REC_WHERE: job[schema.REC_WHERE],
            schema.WIT_PAGE_TITLE: job[schema.WIT_PAGE_TITLE], schema.MODEL_ID: model}
    if not value["cultural"]:
        return Outcome(key, record={**base, schema.CONCEPTS: [], schema.REJECTED: [
            {schema.CONCEPT: job[schema.WIT_PAGE_TITLE], schema.REASON: f"not_cultural: {value[schema.REASON]}"}]},
            attempts=ans.attempts)
    cat, reason = check_concept(value, allowed)
    country = value[schema.COUNTRY].strip()
    if reason is None and country not in countries:
        reason = f"unknown_country: {country!r} is not in the country list"
    if reason is not None:  # a valid answer that fails a check: permanent, not asked again
        return Outcome(key, rejected=reason.split(":")[0], attempts=ans.attempts,
                       message=f"{job[schema.REC_WHERE]} ({job[schema.WIT_PAGE_TITLE]}): {reason}")
    return Outcome(key, record={**base, schema.CONCEPTS: [concept_entry(value, country, cat, "wiki")],
                                schema.REJECTED: []}, attempts=ans.attempts)


def wiki_responder(world: Mapping):
    """The stand-in VLM: the page's entry of the demo table, or 'not cultural'; no image, no answer."""
    def respond(request: Mapping) -> dict:
        parts = [p for m in request.get("messages", []) if isinstance(m.get("content"), list) for p in m["content"]]
        title = up.read_block(up.request_text(request)).get("Title", "")
        entry = world["wiki"].get(title)
        if not any(p.get("type") == "image_url" for p in parts):
            entry = None
        return entry or {"cultural": False, schema.CONCEPT: title, schema.NATIVE_NAME: "", schema.COUNTRY: "",
                         schema.CATEGORY: "", schema.CONTEXT: "", schema.FEATURES: [],
                         schema.REASON: "not a cultural item (stand-in table)"}
    return respond
