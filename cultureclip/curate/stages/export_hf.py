"""The export's Hugging Face ``datasets`` folder (``export.formats=[wds,hf]``): ``<out_dir>/export/hf``.

Made from the export's own shards by :func:`cultureclip.data.hf_dataset.write_hf_dataset`, so it holds
exactly the exported pairs (same keys, image bytes and fields), plus the judge's answer for both images
of each pair and a dataset card built from ``card.md`` that names the stand-ins when any were used.
Publish it with ``tools/push_dataset.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from cultureclip import schema
from cultureclip.curate.card import CARD_ASSETS, CARD_MD
from cultureclip.curate.backends.t2i import is_tiny
from cultureclip.data.hf_dataset import write_hf_dataset

FOLDER = "hf"
FORMATS = ("wds", "hf")
DEFAULTS = {"license": "other", "languages": ["en"]}


def check_formats(formats: Any) -> list[str]:
    """``export.formats`` as a list; ``wds`` is required (the other formats are made from the shards)."""
    formats = [formats] if isinstance(formats, str) else list(formats or [])
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or "wds" not in formats:
        raise ValueError(f"export.formats={formats}: choose from {list(FORMATS)}, wds included (the other formats "
                         f"are made from the shards), e.g. export.formats=[wds,hf]")
    return formats


def judge_columns(rows: Sequence[Mapping], judged: Sequence[Mapping]) -> dict[str, dict]:
    """``{pair_id: {pos_authenticity: ..., neg_picks_own: ...}}``: the judge record of each image of each pair."""
    by_image = {(j[schema.TWIN_ID], j[schema.RENDER_KEY]): j for j in judged}
    out = {}
    for row in rows:
        cols = {}
        for side in (schema.POS_PREFIX, schema.NEG_PREFIX):
            j = by_image[(row[schema.TWIN_ID], row[side])]
            cols.update({f"{side}_{f}": j[f] for f in schema.HF_JUDGE_FIELDS})
        out[row[schema.PAIR_ID]] = cols
    return out


def standins(renders: Mapping[str, Mapping], judged: Sequence[Mapping], ctx) -> list[str]:
    """The stand-in backends behind this data, in words (empty when real models made it)."""
    out = sorted({f"{r[schema.MODEL_ID]} (a random-weight text-to-image pipeline)" for r in renders.values()
                  if is_tiny(str(r.get(schema.MODEL_ID, "")))})
    if ctx.extra.get("standin") is not None or any("standin" in str(j.get(schema.MODEL_ID, "")) for j in judged):
        out.append("the stand-in chat server (answers derived from a hash of the request, not a model)")
    return out


def write(export_dir: Path, rows: Sequence[Mapping], renders: Mapping[str, Mapping], judged: Sequence[Mapping],
          hf_cfg: Mapping, ctx, splits: Sequence[str]) -> dict[str, int]:
    """Write ``export_dir/hf`` from ``export_dir/<split>`` and ``card.md``; returns ``{split: rows}``."""
    cfg = {**DEFAULTS, **dict(hf_cfg or {})}
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown export.hf settings {unknown}; known: {sorted(DEFAULTS)}")
    card_md = export_dir / CARD_MD
    body = card_md.read_text() if card_md.is_file() else ""
    return write_hf_dataset(export_dir, export_dir / FOLDER, splits=splits, judge=judge_columns(rows, judged),
                            card_body=body, card_assets=export_dir / CARD_ASSETS, license=cfg["license"],
                            languages=cfg["languages"], standins=standins(renders, judged, ctx))
