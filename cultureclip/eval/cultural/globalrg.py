"""GlobalRG (retrieval and grounding) as four-way zero-shot multiple choice, as in the CultureCLIP scripts.

- **Retrieval** (``UBC-VL/GlobalRG-Retrieval``, fields ``image``, ``region`` (lower-case country),
  ``universal``): universals present in at least 4 regions are kept; the options are the true region
  and 3 other regions of the same universal, each "The picture depicts a kind of {universal} in
  {region}". Chance 25%.
- **Grounding** (``UBC-VL/globalrg-grounding-task``, fields ``image``, ``region``, ``concept``), reduced
  to multiple choice (not the bounding-box task): images that do not decode are skipped and counted
  *before* the pools are built (the reference verified them first); regions with at least 4 concepts
  are kept; the options are the true concept and 3 other concepts of the same region, each "The item
  in the picture is {concept} in {region}".

Draws (see :func:`cultureclip.eval.multiple_choice.draw_options`): per item, in dataset order,
``sample`` 3 distractors from the sorted pool without the truth, then ``shuffle([truth, *distractors])``,
with one ``random.Random(seed)`` per run. ``protocol="fixed"`` (default) runs ``seeds`` (default
``(0,)``) and reports mean/std; ``protocol="reference"`` runs seed 42 only, i.e. the authors' draw calls
but over sorted pools: they drew from ``list(set(...))``, whose order depends on PYTHONHASHSEED, so
``reference`` matches their numbers only up to that pool order (the result header says so too).
Placing the truth first before the shuffle is our reading of the reference loop. The grounding image
check decodes each image fully, which is stricter than PIL's ``verify``. Local layout: a JSONL (or JSON/parquet)
with the hub field names and ``image`` a path relative to the file (see ``cultureclip.eval.cultural``).
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Optional, Sequence

from cultureclip.eval.cultural import check_on_bad_row, read_rows, select_fields
from cultureclip.eval.multiple_choice import (ImageDecodeError, MCItem, check_on_error, draw_options,
                                              evaluate_item_sets, find_undecodable, make_header, resolve_seeds)

if TYPE_CHECKING:  # scoring imports torch lazily; building items does not need it
    from cultureclip.model import CultureCLIP

RETRIEVAL_ID = "UBC-VL/GlobalRG-Retrieval"
GROUNDING_ID = "UBC-VL/globalrg-grounding-task"
RETRIEVAL_TEMPLATE = "The picture depicts a kind of {universal} in {region}"
GROUNDING_TEMPLATE = "The item in the picture is {concept} in {region}"
MIN_CANDIDATES = 4  # the reference keeps universals with >= 4 regions and regions with >= 4 concepts
NUM_OPTIONS = 4


def load_rows(source: Any = RETRIEVAL_ID, split: Optional[str] = "test", revision: Optional[str] = None,
              images_dir=None):
    """Raw rows of either GlobalRG dataset (see :func:`cultureclip.eval.cultural.read_rows`)."""
    return read_rows(source, split, revision, image_fields=("image",), images_dir=images_dir)


def _pools(rows: Sequence[dict], group: str, member: str, min_candidates: int) -> dict[str, list[str]]:
    """``{group value: sorted distinct member values}`` for groups with at least ``min_candidates``."""
    members = defaultdict(set)
    for r in rows:
        members[r[group]].add(r[member])
    # sorted, never list(set(...)): set order changes with PYTHONHASHSEED and so would the distractors
    return {g: sorted(m) for g, m in members.items() if len(m) >= min_candidates}


def _build(rows, rng, group: str, member: str, template: str, min_candidates: int,
           num_options: int) -> list[MCItem]:
    if min_candidates < num_options:
        raise ValueError(f"min_candidates={min_candidates} cannot fill {num_options} options")
    pools = _pools(rows, group, member, min_candidates)
    items = []
    for r in rows:  # dataset order: the draw sequence depends on it
        if r[group] not in pools:
            continue
        options, answer = draw_options(rng, r[member], pools[r[group]], num_options - 1)
        texts = tuple(template.format(**{group: r[group], member: o}) for o in options)
        items.append(MCItem(r["image"], texts, answer, {group: r[group], member: r[member], "where": r["_where"]}))
    return items


def build_retrieval_items(rows: Sequence[dict], rng: random.Random, min_regions: int = MIN_CANDIDATES,
                          num_options: int = NUM_OPTIONS) -> list[MCItem]:
    """Retrieval items from rows with ``image``, ``region``, ``universal``, drawing from ``rng``."""
    return _build(rows, rng, "universal", "region", RETRIEVAL_TEMPLATE, min_regions, num_options)


def build_grounding_items(rows: Sequence[dict], rng: random.Random, min_concepts: int = MIN_CANDIDATES,
                          num_options: int = NUM_OPTIONS) -> list[MCItem]:
    """Grounding items from rows with ``image``, ``region``, ``concept`` (decodable images only)."""
    return _build(rows, rng, "region", "concept", GROUNDING_TEMPLATE, min_concepts, num_options)


def evaluate_retrieval(model: CultureCLIP, source: Any = RETRIEVAL_ID, split: str = "test",
                       revision: Optional[str] = None, seeds: Optional[Sequence[int]] = None,
                       protocol: str = "fixed", batch_size: int = 64, num_workers: int = 0, amp: bool = True,
                       on_error: str = "skip", on_bad_row: str = "raise", images_dir=None,
                       min_regions: int = MIN_CANDIDATES, num_options: int = NUM_OPTIONS,
                       group_keys: Sequence[str] = ("universal", "region")) -> tuple[dict, dict]:
    """GlobalRG-Retrieval accuracy.

    Args:
        model: the CLIP model.
        source: hub id or local file/folder; split, revision: which data.
        seeds: distractor seeds (``fixed``: default ``(0,)``; ``reference``: always 42).
        protocol: ``"fixed"`` or ``"reference"`` (module docstring).
        batch_size, num_workers, amp: image scoring settings.
        on_error: undecodable image: ``"skip"`` (counted as ``n_skipped``) or ``"raise"``.
        on_bad_row: row missing a field: ``"raise"`` or ``"skip"`` (counted as ``n_bad_rows``).
        images_dir: folder for relative image paths of a local source.
        min_regions, num_options: the filter and the option count (4 and 4 in the reference).
        group_keys: metadata keys reported per group (``acc/region=japan``).

    Returns:
        ``(metrics, header)``: flat metrics and the :func:`make_header` dict for ``write_result``.
    """
    seeds = resolve_seeds(protocol, seeds)
    raw = load_rows(source, split, revision, images_dir)
    rows, bad = select_fields(raw, ("image", "region", "universal"), on_bad_row)
    item_sets = {s: build_retrieval_items(rows, random.Random(s), min_regions, num_options) for s in seeds}
    metrics, skips = evaluate_item_sets(model, item_sets, group_keys, batch_size=batch_size,
                                        num_workers=num_workers, amp=amp, on_error=on_error)
    metrics["n_bad_rows"] = len(bad)
    header = make_header(task="globalrg_retrieval", dataset=source, split=split, revision=revision, seeds=seeds,
                         protocol=protocol, metrics=metrics, n_rows=len(raw), n_bad_rows=len(bad),
                         bad_rows=bad[:5], skipped=skips, template=RETRIEVAL_TEMPLATE,
                         filter=f"universals with >= {min_regions} regions", num_options=num_options)
    return metrics, header


def evaluate_grounding(model: CultureCLIP, source: Any = GROUNDING_ID, split: str = "test",
                       revision: Optional[str] = None, seeds: Optional[Sequence[int]] = None,
                       protocol: str = "fixed", batch_size: int = 64, num_workers: int = 0, amp: bool = True,
                       on_error: str = "skip", on_bad_row: str = "raise", images_dir=None,
                       min_concepts: int = MIN_CANDIDATES, num_options: int = NUM_OPTIONS,
                       group_keys: Sequence[str] = ("region",)) -> tuple[dict, dict]:
    """GlobalRG-Grounding as multiple choice; arguments as :func:`evaluate_retrieval`.

    Images that do not decode are removed before the concept pools are built and counted in
    ``n_skipped`` (with ``on_error="raise"`` the first one raises).
    """
    seeds = resolve_seeds(protocol, seeds)
    check_on_bad_row(on_bad_row)
    check_on_error(on_error)
    raw = load_rows(source, split, revision, images_dir)
    rows, bad = select_fields(raw, ("image", "region", "concept"), on_bad_row)
    failed = find_undecodable([r["image"] for r in rows], num_workers=num_workers)
    if failed and on_error == "raise":
        i = min(failed)
        raise ImageDecodeError(f"{rows[i]['_where']}: image cannot be decoded: {failed[i]}")
    verified = [r for i, r in enumerate(rows) if i not in failed]
    item_sets = {s: build_grounding_items(verified, random.Random(s), min_concepts, num_options) for s in seeds}
    metrics, skips = evaluate_item_sets(model, item_sets, group_keys, batch_size=batch_size,
                                        num_workers=num_workers, amp=amp, on_error=on_error)
    metrics["n_skipped"] += len(failed)
    metrics["n_bad_rows"] = len(bad)
    skips["unverified"] = [f"{rows[i]['_where']}: {reason}" for i, reason in sorted(failed.items())][:5]
    header = make_header(task="globalrg_grounding", dataset=source, split=split, revision=revision, seeds=seeds,
                         protocol=protocol, metrics=metrics, n_rows=len(raw), n_bad_rows=len(bad),
                         bad_rows=bad[:5], n_unverified=len(failed), skipped=skips, template=GROUNDING_TEMPLATE,
                         filter=f"regions with >= {min_concepts} concepts", num_options=num_options)
    return metrics, header
