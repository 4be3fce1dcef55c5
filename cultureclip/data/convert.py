"""Convert twin-pair records (the authors' JSON/JSONL, or a generic JSONL) into twin shards.

Two row formats are accepted, detected per row:

* authors': ``pos_image_path, pos_caption, pos_concept, neg_image_path, neg_caption, neg_concept``;
* generic: the same texts with ``pos_image`` / ``neg_image`` as the image paths.

Both may carry ``pos_country, neg_country, category, pair_id, pos_context, neg_context, pos_features,
neg_features``; other columns are dropped. As in the reference pipeline's rows, ``category`` and the
features may sit under ``metadata``, and features may be one string (stored as a one-element list);
this mapping is the curation importer's (:func:`cultureclip.data.pair_fields.pair_meta_extras`), so
converted data keeps its categories for per-category evaluation. Relative image paths are resolved
against ``image_root``, or against the input file's folder when it is None.

A bad record (missing column, blank caption, missing or undecodable image, an image over the pixel
cap ``max_pixels``) either raises a :class:`RecordError` naming ``file:line`` and the field, or, with
``on_error="skip"``, is skipped, counted by reason (``bad_record``, ``missing_image``, ``bad_image``,
``too_large``) and logged. An unreadable image is never replaced by a placeholder. Images are read by
:mod:`cultureclip.images` (8-bit RGB rules, header-checked pixel cap).

Output: ``shard-%06d.tar`` files, ``convert_report.json`` (always written: counts and the skip list)
and ``sizes.json``. Everything is written into a hidden temporary folder inside ``out_dir`` and moved
in at the end, ``sizes.json`` last, so a failed run never leaves output that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from cultureclip import schema
from cultureclip.data.pair_fields import pair_meta_extras
from cultureclip.data.shards import RecordError, TwinShardWriter, validate_pair_meta
from cultureclip.images import DEFAULT_MAX_PIXELS, ImageDecodeError, SkipCounter, check_on_error, image_to_bytes

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
REPORT_FILE = "convert_report.json"
_head, _tail = schema.SHARD_PATTERN.split("%06d")
_SHARD_RE = re.compile(re.escape(_head) + r"\d{6,}" + re.escape(_tail) + "$")


@dataclass
class ConvertReport:
    """Outcome of :func:`convert_to_shards`.

    Attributes:
        written: pairs written.
        skipped: records skipped (only with ``on_error="skip"``).
        skipped_by_reason: ``{reason: count}`` of the skipped records.
        skips: ``(where, message)`` for every skipped record, in input order.
        sizes: ``{shard name: pairs}``, as stored in ``sizes.json``.
    """

    written: int = 0
    skipped: int = 0
    skipped_by_reason: dict = field(default_factory=dict)
    skips: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)


def _iter_rows(path: PathLike) -> Iterator[tuple[str, object]]:
    """Yield ``(where, row)``; a row that cannot be parsed is yielded as a RecordError instance."""
    path = Path(path)
    data = path.read_bytes()
    if data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):  # a JSON list; anything else is JSONL
        try:
            rows = json.loads(data)
        except ValueError as exc:  # the whole file is unusable: not a per-record problem
            raise RecordError(f"{path}:{getattr(exc, 'lineno', '?')}: invalid JSON: {exc}") from exc
        for index, row in enumerate(rows):
            yield f"{path}:[{index}]", row
        return
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both derive from it
            yield f"{path}:{lineno}", RecordError(f"{path}:{lineno}: invalid JSON: {exc}")


def iter_records(path: PathLike) -> Iterator[tuple[str, dict]]:
    """Iterate over the records of a JSONL file or a JSON list.

    Args:
        path: a ``.jsonl`` file (one object per line, blank lines skipped) or a JSON file holding a
            list of objects (detected by its first character, ``[``).

    Yields:
        ``(where, row)`` with ``where`` = ``"file.jsonl:LINE"`` (1-based) or ``"file.json:[INDEX]"``.

    Raises:
        RecordError: a line is not valid JSON, or a row is not an object.
    """
    for where, row in _iter_rows(path):
        yield where, _checked_row(where, row)


def _checked_row(where: str, row: object) -> dict:
    """The row if it is a JSON object; raises the RecordError of an unparsable line, or a new one."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def _image_paths(row: dict, where: str) -> list[tuple[str, object]]:
    """Return ``[(column, value), (column, value)]`` for the two images, detecting the format."""
    if schema.POS_IMAGE_PATH in row and schema.POS_IMAGE in row:
        raise RecordError(f"{where}: ambiguous row, has both {schema.POS_IMAGE_PATH!r} (authors' "
                          f"format) and {schema.POS_IMAGE!r} (generic format)")
    if schema.POS_IMAGE_PATH in row:
        columns = (schema.POS_IMAGE_PATH, schema.NEG_IMAGE_PATH)
    elif schema.POS_IMAGE in row:
        columns = (schema.POS_IMAGE, schema.NEG_IMAGE)
    else:
        raise RecordError(f"{where}: missing field {schema.POS_IMAGE_PATH!r} (authors' format) "
                          f"or {schema.POS_IMAGE!r} (generic format)")
    for column in columns:
        if column not in row or row[column] is None:
            raise RecordError(f"{where}: missing field {column!r}")
    return [(column, row[column]) for column in columns]


def _inside(base: Path, value: str) -> bool:
    """Whether ``base / value`` stays inside ``base`` as written: ``..`` and absolute paths cannot leave
    it, while symlinks that the root's owner placed inside it are followed, not judged (a Hugging Face
    hub snapshot links every file to a blob outside its folder)."""
    root = os.path.normpath(os.path.abspath(base))
    return os.path.commonpath([root, os.path.normpath(os.path.join(root, value))]) == root


def _load_image(column: str, value: object, base: Path, resize: Optional[int], where: str,
                max_pixels: Optional[int], contain: bool = False) -> tuple[bytes, str]:
    """Encode one image, turning any failure into a RecordError naming the column and path; with
    ``contain``, a path outside ``base`` is a bad record (reason ``outside_root``)."""
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {column!r} must be a non-empty path, got {value!r}")
    if contain and not _inside(base, value):
        raise RecordError(f"{where}: {column} {value!r} is outside the image root {str(base)!r}; fix the path, or "
                          f"allow paths outside the root (--allow-outside-root, allow_outside_root=True)",
                          reason="outside_root")
    path = base / value  # an absolute value replaces base
    if not path.is_file():
        raise RecordError(f"{where}: {column} {str(path)!r}: image file not found", reason="missing_image")
    try:
        return image_to_bytes(path, resize, max_pixels=max_pixels, name=f"{where}: {column} {str(path)!r}")
    except ImageDecodeError as exc:  # its message names the row, the column and the path
        raise RecordError(str(exc), reason=exc.reason) from exc
    except OSError as exc:  # unreadable file (permissions, I/O error)
        raise RecordError(f"{where}: {column} {str(path)!r}: cannot read image: {exc}",
                          reason="missing_image") from exc


def _pair_key(row: dict, n: int, key_prefix: str, where: str) -> str:
    """The sample key: the sanitized ``pair_id`` when given, else ``key_prefix`` + row number."""
    pair_id = row.get(schema.PAIR_ID)
    if pair_id is None:
        return f"{key_prefix}{n:09d}"
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)):
        raise RecordError(f"{where}: field {schema.PAIR_ID!r} must be a string or integer, got {pair_id!r}")
    # webdataset splits member names at the first dot, and "/" would make folders inside the tar
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(pair_id).strip())
    if not key:
        raise RecordError(f"{where}: field {schema.PAIR_ID!r} is empty")
    return key


def _existing_outputs(out_dir: Path) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return [p for p in out_dir.iterdir()
            if _SHARD_RE.match(p.name) or p.name in (schema.SIZES_FILE, REPORT_FILE)]


def convert_to_shards(inputs: Sequence[PathLike], out_dir: PathLike, image_root: Optional[PathLike] = None,
                      maxcount: int = 1000, resize: Optional[int] = None, on_error: str = "raise",
                      key_prefix: str = "pair", overwrite: bool = False,
                      max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                      allow_outside_root: bool = False) -> ConvertReport:
    """Convert record files into twin shards in ``out_dir``.

    Args:
        inputs: JSONL or JSON-list files, in order; rows of both formats may be mixed.
        out_dir: folder for the shards; created if missing. Other files in it are left alone.
        image_root: folder that relative image paths are resolved against; None means each input
            file's own folder.
        maxcount: pairs per shard.
        resize: if set, store images with their shorter side shrunk to this many pixels (JPEG).
        on_error: ``"raise"`` stops at the first bad record; ``"skip"`` skips, counts and logs it.
        key_prefix: prefix of generated keys ``f"{key_prefix}{n:09d}"``, n = 0-based row number over
            all inputs (skipped rows included, so keys do not shift when a bad row is fixed).
        overwrite: replace shards, ``sizes.json`` and ``convert_report.json`` already in ``out_dir``
            (they are removed only once the new conversion has succeeded).
        max_pixels: pixel cap per image, checked from the file header before decoding (None:
            Pillow's own limit only); a larger image is a bad record (reason ``too_large``).
        allow_outside_root: with ``image_root`` given, an image path that leaves it (``..``, an
            absolute path elsewhere) is a bad record (reason ``outside_root``) unless this is True.
            Symlinks inside the root are followed either way.

    Returns:
        A :class:`ConvertReport`.

    Raises:
        RecordError: a bad record with ``on_error="raise"``, or an input that is not JSON at all.
        FileNotFoundError: an input file does not exist.
        FileExistsError: ``out_dir`` already holds shards and ``overwrite`` is False.
    """
    check_on_error(on_error)
    if not key_prefix or not re.fullmatch(r"[A-Za-z0-9_-]+", key_prefix):
        raise ValueError(f"key_prefix must be non-empty letters, digits, '_' or '-', got {key_prefix!r}")
    for path in inputs:  # fail before any work rather than after converting the first inputs
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file {str(path)!r} not found")
    out_dir = Path(out_dir)
    old = _existing_outputs(out_dir)
    if old and not overwrite:
        raise FileExistsError(f"{out_dir} already holds converter output ({old[0].name}, ...); "
                              f"pass overwrite=True to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-partial-", dir=out_dir))
    report = ConvertReport()
    try:
        # the writer does no resizing: images are encoded here once, so errors name their field
        writer = TwinShardWriter(tmp, maxcount=maxcount)
        try:
            _convert(inputs, writer, image_root, resize, on_error, key_prefix, report, max_pixels,
                     contain=image_root is not None and not allow_outside_root)
        except BaseException:
            with contextlib.suppress(Exception):  # only to release the file; tmp is deleted below
                writer.close()
            raise
        report.sizes = writer.close()
        for path in tmp.iterdir():  # webdataset opens its first shard eagerly: drop it if empty
            if _SHARD_RE.match(path.name) and path.name not in report.sizes:
                path.unlink()
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=1, ensure_ascii=False))
        for path in sorted(old, key=lambda p: p.name != schema.SIZES_FILE):  # sizes.json first
            path.unlink()
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == schema.SIZES_FILE):  # ... and last
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote %d pairs in %d shards to %s, skipped %d", report.written, len(report.sizes),
             out_dir, report.skipped)
    return report


def _pair_meta(row: dict, where: str) -> dict:
    """The json part of one pair: the required texts, then the optional fields as the importer reads them."""
    meta = validate_pair_meta(row, where)
    extras = pair_meta_extras(row, where)
    for name in (schema.CATEGORY, schema.POS_CONTEXT, schema.NEG_CONTEXT, schema.POS_FEATURES, schema.NEG_FEATURES):
        meta.pop(name, None)  # raw copies (a string of features, a blank context) give way to the checked values
    meta.update(extras)
    return meta


def _convert(inputs, writer, image_root, resize, on_error, key_prefix, report, max_pixels, contain=False) -> None:
    seen: dict[str, str] = {}  # key -> where it was first used, to name both rows of a duplicate
    counter = SkipCounter(logger=log)
    n = -1
    for input_path in inputs:
        base = Path(image_root) if image_root is not None else Path(input_path).parent
        for where, row in _iter_rows(input_path):
            n += 1
            try:
                row = _checked_row(where, row)
                images = _image_paths(row, where)
                meta = _pair_meta(row, where)
                key = _pair_key(row, n, key_prefix, where)
                if key in seen:
                    raise RecordError(f"{where}: duplicate {schema.PAIR_ID} / key {key!r}, "
                                      f"already used at {seen[key]}")
                # both images are decoded before anything is written: no half-written pair
                pos, neg = (_load_image(c, v, base, resize, where, max_pixels, contain)[0] for c, v in images)
            except RecordError as exc:
                if on_error == "raise":
                    raise
                counter.add(exc.reason, where, str(exc).removeprefix(f"{where}: "))
                report.skipped += 1
                report.skips.append((where, str(exc)))
                report.skipped_by_reason = dict(sorted(counter.by_reason.items()))
                continue
            writer.write(key, pos, neg, meta)
            seen[key] = where
            report.written += 1
    counter.flush()
