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
from cultureclip.curate.messages import field_block, read_block, request_text, system_user  # noqa: F401 (used as up.*)
from cultureclip.curate.runner import Store, digest


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
    return digest({"concept": {schema.CONCEPT: concept, schema.COUNTRY: country, schema.CATEGORY: category}})


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
    (:func:`cultureclip.curate.backends.chat.effective_chat`)."""
    from cultureclip.curate.backends.chat import effective_chat
    settings = effective_chat(plain(cfg.get("chat") or {}), plain(getattr(ctx, "chat", None) or {}))
    if not settings.get("model") or not settings.get("base_url"):
        raise ValueError(f"the chat backend needs base_url and model (got {sorted(settings)}): set chat.base_url "
                         f"and chat.model, or the stage's own chat group")
    return settings


def chat_client(cfg: Mapping, ctx: Any) -> tuple[Any, str, dict]:
    """A chat client for a stage (see :func:`chat_settings`), made on its first request; its model id; and
    its sampling settings, which change the answers and so go into the stage's job keys."""
    from cultureclip.curate.backends.chat import LazyChatClient  # needs the curate extra
    from cultureclip.curate.backends.chat_config import sampling_settings
    settings = chat_settings(cfg, ctx)
    return LazyChatClient(settings), str(settings["model"]), sampling_settings(settings)


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


def counts(counter: Mapping[str, int]) -> dict:
    """A Counter as a plain dict sorted by key (the card's JSON must not depend on reading order)."""
    return dict(sorted(counter.items()))


def stage_store(out_dir: Any, stage: str) -> Store:
    """The store of ``stage`` in a run folder."""
    return Store(Path(out_dir) / stage, stage)


def load_current(out_dir: Any, stage: str, consumer: str, upstream: Sequence[str] = ()) -> list[dict]:
    """The current records of ``out_dir/stage``, sorted by concept id; refused while that view is incomplete
    or was planned from other views of ``upstream`` than their current ones.

    Raises:
        FileNotFoundError: the stage never ran. ValueError: incomplete, out of date, or empty.
    """
    store = stage_store(out_dir, stage)
    store.require_complete(consumer, upstream=[stage_store(out_dir, u) for u in upstream])
    recs = sorted(store.records(), key=lambda r: (r[schema.CONCEPT_ID], r[schema.REC_KEY]))
    if not recs:
        raise ValueError(f"{store.root} holds no current records: nothing for stage={consumer} to do")
    return recs
