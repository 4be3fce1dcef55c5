"""CROPE as two-way zero-shot multiple choice, as in the CultureCLIP scripts.

``Malvinan/CROPE``, split ``test``; only rows whose ``answer`` is exactly ``"no"`` are used (the image
does *not* show the definition's concept). Fields: ``image``, ``definition_images`` (a list),
``metadata.image_en_concept``, ``metadata.definition_concept``. Per row the two options
"There is {image_en_concept} in the image." and "There is {definition_concept} in the image." are
shuffled once (one ``rng.shuffle`` per kept row, in dataset order, one ``random.Random(seed)`` per run);
the main image must choose the first, every definition image the second, with the same option order.
All images are pooled into one accuracy (``acc``; ``acc/role=main`` and ``acc/role=definition`` split
it). Chance 50%. ``protocol="reference"`` runs seed 42 only (the authors' ``random.seed(42)``); CROPE
draws from no set-built pool, so given the same row order and the option list starting
``[image concept, definition concept]`` (our reading of the reference) it replays the authors' shuffles
exactly. ``"fixed"`` runs ``seeds`` and reports mean/std.

Local layout: a JSONL (or JSON/parquet) with the hub field names, ``metadata`` a nested object, and
``image``/``definition_images`` paths relative to the file (see ``cultureclip.eval.cultural``).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Optional, Sequence

from cultureclip.eval.cultural import RowError, check_on_bad_row, keep_bad_row, read_rows, select_fields
from cultureclip.eval.multiple_choice import MCItem, evaluate_item_sets, make_header, resolve_seeds

if TYPE_CHECKING:  # scoring imports torch lazily; building items does not need it
    from cultureclip.model import CultureCLIP

DATASET_ID = "Malvinan/CROPE"
TEMPLATE = "There is {concept} in the image."
REFERENCE_NOTE = ("protocol=reference replays the authors' draws: random.Random(42), one shuffle of "
                  "[image concept option, definition concept option] per answer=='no' row, in dataset order; "
                  "no set-built pool is involved, so no PYTHONHASHSEED dependence.")
IMAGE_CONCEPT, DEFINITION_CONCEPT = "metadata.image_en_concept", "metadata.definition_concept"
FIELDS = ("image", "definition_images", IMAGE_CONCEPT, DEFINITION_CONCEPT)


def load_rows(source: Any = DATASET_ID, split: Optional[str] = "test", revision: Optional[str] = None,
              images_dir=None):
    """Raw CROPE rows (see :func:`cultureclip.eval.cultural.read_rows`)."""
    return read_rows(source, split, revision, image_fields=("image", "definition_images"), images_dir=images_dir)


def select_rows(raw, on_bad_row: str = "raise") -> tuple[list[dict], list[str], int]:
    """``(rows with answer == "no" and all fields, bad-row messages, number of other-answer rows)``."""
    answered, bad = select_fields(raw, ("answer",), on_bad_row)
    keep = {r["_where"] for r in answered if r["answer"] == "no"}
    rows, bad_fields = select_fields([r for r in raw if r.where in keep], FIELDS, on_bad_row,
                                     allow_empty=("definition_images",))
    good = []
    for r in rows:
        if not isinstance(r["definition_images"], (list, tuple)):
            kind = type(r["definition_images"]).__name__
            msg = f"{r['_where']}: field 'definition_images' must be a list, got {kind}"
            keep_bad_row(RowError(msg), on_bad_row, bad_fields)
            continue
        good.append(r)
    return good, bad + bad_fields, len(answered) - len(keep)


def build_items(rows: Sequence[dict], rng: random.Random) -> list[MCItem]:
    """One item for the main image and one per definition image of every row; options shuffled per row."""
    items = []
    for r in rows:
        image_text = TEMPLATE.format(concept=r[IMAGE_CONCEPT])
        definition_text = TEMPLATE.format(concept=r[DEFINITION_CONCEPT])
        options = [image_text, definition_text]
        rng.shuffle(options)
        options = tuple(options)
        meta = {"role": "main", "concept": r[IMAGE_CONCEPT], "where": r["_where"]}
        items.append(MCItem(r["image"], options, options.index(image_text), meta))
        for k, image in enumerate(r["definition_images"]):
            meta = {"role": "definition", "concept": r[DEFINITION_CONCEPT],
                    "where": f"{r['_where']} definition_images[{k}]"}
            items.append(MCItem(image, options, options.index(definition_text), meta))
    return items


def evaluate(model: CultureCLIP, source: Any = DATASET_ID, split: str = "test", revision: Optional[str] = None,
             seeds: Optional[Sequence[int]] = None, protocol: str = "fixed", batch_size: int = 64,
             num_workers: int = 0, amp: bool = True, on_error: str = "skip", on_bad_row: str = "raise",
             images_dir=None, group_keys: Sequence[str] = ("role",)) -> tuple[dict, dict]:
    """CROPE accuracy over main and definition images pooled.

    Args:
        model: the CLIP model.
        source: hub id or local file/folder; split, revision: which data.
        seeds: option-shuffle seeds (``fixed``: default ``(0,)``; ``reference``: always 42).
        protocol: ``"fixed"`` or ``"reference"``.
        batch_size, num_workers, amp: image scoring settings.
        on_error: undecodable image: ``"skip"`` (counted as ``n_skipped``) or ``"raise"``.
        on_bad_row: row missing a field: ``"raise"`` or ``"skip"`` (counted as ``n_bad_rows``).
        images_dir: folder for relative image paths of a local source.
        group_keys: metadata keys reported per group.

    Returns:
        ``(metrics, header)`` for ``write_result``.
    """
    seeds = resolve_seeds(protocol, seeds)
    check_on_bad_row(on_bad_row)
    raw = load_rows(source, split, revision, images_dir)
    rows, bad, n_other = select_rows(raw, on_bad_row)
    item_sets = {s: build_items(rows, random.Random(s)) for s in seeds}
    # the same scoring and header calls as the GlobalRG evaluators, on purpose: each benchmark's entry point
    # reads top to bottom as its protocol (rows, items per seed, scores, header with its own fields)
    metrics, skips = evaluate_item_sets(model, item_sets, group_keys, batch_size=batch_size,
                                        num_workers=num_workers, amp=amp, on_error=on_error)
    metrics["n_bad_rows"] = len(bad)
    header = make_header(task="crope", dataset=source, split=split, revision=revision, seeds=seeds,
                         protocol=protocol, metrics=metrics, n_rows=len(raw), n_rows_answer_no=len(rows),
                         n_rows_other_answer=n_other, n_bad_rows=len(bad), bad_rows=bad[:5], skipped=skips,
                         template=TEMPLATE, filter='answer == "no"', **({"protocol_note": REFERENCE_NOTE}
                                                                         if protocol == "reference" else {}))
    return metrics, header
