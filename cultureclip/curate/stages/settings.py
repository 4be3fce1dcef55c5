"""Every stage's settings, typed, with their defaults in one place.

The config groups (``conf/<stage>/*.yaml``) spell the same keys so that the command line can override
them; ``tests/test_curate_settings.py`` checks that each shipped default file agrees with these
dataclasses. :func:`typed` is how every stage reads its group: unknown keys are refused by name, alike
in every stage, and absent keys take the defaults below.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Mapping, Optional


def typed(cls: type, given: Optional[Mapping[str, Any]], what: str) -> dict:
    """``given`` checked against the dataclass ``cls`` and completed with its defaults, as a plain dict.

    Nested settings that are dataclasses themselves (``top_down``, ``wiki``, ``seed``) are checked the same
    way; free-form mappings (``chat``, ``embedding``, ``rule``, ``ray``) are checked by their own readers.

    Raises:
        ValueError: a key ``cls`` does not have, named with the stage (``what``) and the known keys.
    """
    given = dict(given or {})
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    out = asdict(cls())
    for name, value in given.items():
        default = known[name].default_factory() if known[name].default_factory is not MISSING else None
        if hasattr(default, "__dataclass_fields__") and (value is None or isinstance(value, Mapping)):
            value = typed(type(default), value, f"{what}.{name}")
        out[name] = value
    return out


@dataclass
class TopDown:
    countries: Optional[list] = None  # None: the shipped country list
    countries_file: Optional[str] = None
    n_per_cell: int = 1


@dataclass
class Wiki:
    files: list = field(default_factory=list)
    dataset: Optional[str] = None
    data_files: Any = None
    split: str = "train"
    limit: Optional[int] = None
    chat: dict = field(default_factory=dict)


@dataclass
class Seed:
    file: Optional[str] = None


@dataclass
class Concepts:
    sources: list = field(default_factory=lambda: ["top_down"])
    categories: Optional[list] = None  # None: the paper's six
    chat: dict = field(default_factory=dict)
    top_down: TopDown = field(default_factory=TopDown)
    wiki: Wiki = field(default_factory=Wiki)
    seed: Seed = field(default_factory=Seed)
    chunk: int = 256


@dataclass
class Dedup:
    text: str = "name"
    threshold: float = 0.92
    neighbours: int = 10
    embedding: dict = field(default_factory=dict)


@dataclass
class Twins:
    llm_candidates: int = 3
    mined_candidates: int = 3
    keep: int = 2
    min_similarity: int = 3
    chat: dict = field(default_factory=dict)
    embedding: dict = field(default_factory=dict)
    chunk: int = 64


@dataclass
class Captions:
    n: int = 10
    max_words: int = 14
    require_name: bool = True
    max_rounds: int = 3
    chat: dict = field(default_factory=dict)
    chunk: int = 64


@dataclass
class Render:
    model: str = "stabilityai/stable-diffusion-3.5-large-turbo"
    dtype: str = "float16"
    device: str = "auto"
    width: int = 512
    height: int = 512
    steps: int = 4
    guidance: float = 0.0
    negative_prompt: Optional[str] = None
    images_per_caption: int = 1
    batch_size: int = 4
    prompt_template: str = "{caption}"  # fields: caption, concept, country, category
    max_sequence_length: Optional[int] = None  # SD3's T5 length; None: its default
    part_size: int = 64
    cpu_offload: bool = False
    variant: Optional[str] = None
    local_files_only: bool = False
    ray: Optional[dict] = None  # a mapping: render on a Ray cluster (cultureclip.curate.backends.ray_render)


@dataclass
class Judge:
    chat: dict = field(default_factory=dict)
    part_size: int = 256


@dataclass
class Export:
    pairs_per_twin: Optional[int] = 10
    val_fraction: float = 0.1
    split_seed: int = 0
    maxcount: int = 1000
    resize: Optional[int] = None
    rule: dict = field(default_factory=dict)  # overrides of the judge's pass rule (judge_rule.DEFAULT_RULE)
    gallery_size: int = 24
    thumbnail_size: int = 128
    plots: bool = True
    formats: list = field(default_factory=lambda: ["wds"])  # [wds,hf]: also export/hf, a Hugging Face datasets folder
    hf: dict = field(default_factory=lambda: {"license": "other", "languages": ["en"]})  # the dataset card (export_hf.py)
