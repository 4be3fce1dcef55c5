"""What the upstream curation stages (concepts, dedup, twins, captions) share.

The category enum, name normalisation, the shipped country list, the chat client built from a stage's
config, and the plain-text "Field: value" blocks that every prompt carries for its own item (the
stand-in responders read the same blocks back, so they answer from what the request says).
"""
from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from enum import Enum
from importlib import resources
from pathlib import Path
from itertools import islice
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate.records import StageStore, record_key, write_atomic


class Category(str, Enum):
    """The concept categories. The first six are the paper's and the default; the last two exist
    (the authors had them) but are off unless a config lists them."""

    CUISINE = "Cuisine"
    CLOTHING = "Clothing"
    ART = "Art"
    ARCHITECTURE = "Architecture"
    SYMBOL = "Symbol"
    FESTIVAL = "Festival"
    ANIMALS_PLANTS = "Animals & Plants"
    DAILY_LIFE = "Daily Life"


DEFAULT_CATEGORIES = tuple(list(Category)[:6])


class UnknownCategory(ValueError):
    """A category that is not in :class:`Category` (never mapped to a default)."""


class CategoryNotEnabled(UnknownCategory):
    """A category of the enum that the config does not enable."""


def _category_token(text: str) -> str:
    return re.sub(r"[^a-z]+", "", text.casefold().replace("&", "and"))


def parse_category(value: Any, allowed: Optional[Sequence[Category]] = None) -> Category:
    """The :class:`Category` named by ``value`` (case, spaces, ``&``/``and`` and ``_`` ignored).

    Raises:
        UnknownCategory: ``value`` names no category, or one outside ``allowed``.
    """
    token = _category_token(str(value or ""))
    for cat in Category:
        if token in (_category_token(cat.value), _category_token(cat.name)):
            if allowed is not None and cat not in allowed:
                raise CategoryNotEnabled(f"category {value!r} is not enabled (enabled: {[c.value for c in allowed]})")
            return cat
    raise UnknownCategory(f"category {value!r} is not one of {[c.value for c in Category]}")


def categories_from(names: Optional[Iterable[Any]]) -> tuple[Category, ...]:
    """The enabled categories of a config (None: the paper's six), in enum order, each once."""
    if names is None:
        return DEFAULT_CATEGORIES
    chosen = {parse_category(n) for n in names}
    return tuple(c for c in Category if c in chosen)


def normalize_name(text: str) -> str:
    """A name for comparisons: NFKC, casefold, diacritics and punctuation removed, spaces collapsed
    (``"Phở bò"`` and ``"pho-bo"`` both give ``"pho bo"``)."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", str(text)).casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = text.replace("đ", "d").replace("ø", "o").replace("ł", "l").replace("ß", "ss")  # no decomposition
    text = "".join(ch if ch.isalnum() else " " for ch in text)
    return " ".join(text.split())


def concept_id(concept: str, country: Optional[str], category: str) -> str:
    """The key of a concept: its name, country and category."""
    return record_key("concept", {schema.CONCEPT: concept, schema.COUNTRY: country, schema.CATEGORY: category})


def plain(cfg: Any) -> Any:
    """A config (dict, OmegaConf DictConfig/ListConfig, ...) as plain dicts and lists."""
    if isinstance(cfg, Mapping):
        return {str(k): plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)) or (hasattr(cfg, "__iter__") and type(cfg).__name__ == "ListConfig"):
        return [plain(v) for v in cfg]
    return cfg


def load_countries(path: Optional[str] = None) -> list[str]:
    """The country/territory list: ``path``, or the shipped one; '#' lines are comments.

    Raises:
        ValueError: a name appears twice (naming the line).
    """
    if path is None:
        text = resources.files("cultureclip").joinpath("data_files/countries.txt").read_text("utf-8")
        where = "cultureclip/data_files/countries.txt"
    else:
        with open(path, encoding="utf-8") as f:
            text, where = f.read(), str(path)
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in seen:
            raise ValueError(f"{where}:{lineno}: {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = lineno
        names.append(name)
    return names


def load_demo_world() -> dict:
    """The stand-in responders' table of real concepts, twins and verdicts (demo and tests only)."""
    text = resources.files("cultureclip").joinpath("data_files/curate_demo_world.json").read_text("utf-8")
    return json.loads(text)


def chat_settings(cfg: Mapping, ctx: Any) -> dict:
    """The stage's own ``chat`` group overridden key by key by the run's non-null ``ctx.chat`` settings
    (:func:`cultureclip.curate.chat.effective_chat`)."""
    from cultureclip.curate.chat import effective_chat
    settings = effective_chat(plain(cfg.get("chat") or {}), plain(getattr(ctx, "chat", None) or {}))
    if not settings.get("model") or not settings.get("base_url"):
        raise ValueError(f"the chat backend needs base_url and model (got {sorted(settings)}): set chat.base_url "
                         f"and chat.model, or the stage's own chat group")
    return settings


def chat_client(cfg: Mapping, ctx: Any) -> tuple[Any, str]:
    """A ChatClient for a stage (see :func:`chat_settings`) and its model id."""
    from cultureclip.curate.chat import ChatClient  # needs the curate extra
    settings = chat_settings(cfg, ctx)
    return ChatClient(settings), str(settings["model"])


# ---------------------------------------------------------------------------- prompt blocks
def field_block(fields: Mapping[str, Any]) -> str:
    """``Label: value`` lines for one item (lists joined with '; '), the part of a prompt that is its own."""
    lines = []
    for label, value in fields.items():
        if isinstance(value, (list, tuple)):
            value = "; ".join(str(v) for v in value)
        lines.append(f"{label}: {'' if value is None else value}")
    return "\n".join(lines)


def read_block(text: str) -> dict[str, str]:
    """The ``Label: value`` lines of a text, by label (the first occurrence of each)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z][A-Za-z ]{1,40}): (.*)$", line.strip())
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def request_text(request: Mapping) -> str:
    """All text parts of a chat request's user messages (what a responder answers from)."""
    parts = []
    for msg in request.get("messages", []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(p.get("text", "") for p in content or [] if p.get("type") == "text")
    return "\n".join(parts)


def system_user(system: str, user: Any) -> list[dict]:
    """A fresh two-message list (built per item: no shared template is ever mutated)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------------- small helpers
def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Lists of at most ``size`` items."""
    it = iter(items)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


def counter_md(counts: Mapping[str, int], head: tuple[str, str] = ("reason", "count"), limit: int = 30) -> str:
    """A markdown table of counts, largest first (ties by name)."""
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
    if not rows:
        return "_none_\n"
    lines = [f"| {head[0]} | {head[1]} |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in rows[:limit]]
    if len(rows) > limit:
        lines.append(f"| ... {len(rows) - limit} more | {sum(v for _, v in rows[limit:])} |")
    return "\n".join(lines) + "\n"


def error_reasons(store: Any) -> Counter:
    """Counts of the current errors of a stage store, by reason."""
    return Counter(e[schema.REC_ERROR] for e in store.errors().values())


CURRENT = "current.json"  # a stage folder's list of its latest run's job keys


def write_current(stage_dir: Path, jobs: Sequence[Mapping]) -> None:
    """Record which keys the latest run's jobs have: records of an earlier input stay on disk (they are
    never deleted), and :func:`current_records` leaves them out."""
    write_atomic(Path(stage_dir) / CURRENT, json.dumps(sorted(j[schema.REC_KEY] for j in jobs)))


def current_records(stage_dir: Path, stage: str) -> list[dict]:
    """The records of a store that belong to its latest run's jobs (all of them if it never listed them)."""
    stage_dir = Path(stage_dir)
    records = StageStore(stage_dir, stage).records()
    if (stage_dir / CURRENT).is_file():
        keys = set(json.loads((stage_dir / CURRENT).read_text()))
        records = [r for r in records if r[schema.REC_KEY] in keys]
    return records


def load_current(out_dir: Any, stage: str, what: str) -> list[dict]:
    """The latest run's records of ``out_dir/stage``, sorted by concept id; ValueError when there are none."""
    recs = current_records(Path(out_dir) / stage, stage)
    if not recs:
        raise ValueError(f"{Path(out_dir) / stage} holds no {what}: run stage={stage} first")
    return sorted(recs, key=lambda r: r[schema.CONCEPT_ID])


def require_complete(stage_dir: Path, stage: str, consumer: str) -> None:
    """Refuse to read a store whose latest run still has jobs neither done nor failed (another job range
    of ``num_shards`` not finished yet): a stage reading it would silently miss their records.

    Raises:
        ValueError: naming the store and the counts.
    """
    store = StageStore(stage_dir, stage)
    reports = store.reports()
    if not reports:
        return  # written by another tool (or an older run): nothing to compare with
    total = max(r["jobs_total"] for r in reports)
    finished = len(store.done_keys() | set(store.errors()))
    if finished < total:
        raise ValueError(f"{stage_dir}: {total - finished} of {total} {stage} jobs are not finished (another "
                         f"job range still running, or not run yet); run every shard_index of stage={stage} "
                         f"before stage={consumer}")
