"""Write twin-pair WebDataset shards (one tar sample per pair) and the ``sizes.json`` beside them.

Both twins live in one sample so that a batch always holds both halves of every pair; see
:mod:`cultureclip.schema` for the member names.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.images import DEFAULT_MAX_PIXELS, image_to_bytes
from cultureclip.rundir import raise_if_disk_full

SHARD_MTIME = 1_700_000_000  # 2023-11-14, any fixed integer works
ImageLike = Union[Image.Image, bytes, str, os.PathLike]


class RecordError(ValueError):
    """A twin-pair record is invalid; the message names where (file:line) and which field.

    ``reason`` says what kind of problem it is, for skip counts (``bad_record``, ``missing_image``,
    or an image reason of :mod:`cultureclip.images` such as ``bad_image`` / ``too_large``).
    """

    def __init__(self, message: str, reason: str = "bad_record") -> None:
        super().__init__(message)
        self.reason = reason


def validate_pair_meta(meta: Mapping[str, Any], where: str = "record") -> dict:
    """Check the json part of a pair and return a clean copy.

    Args:
        meta: the pair's fields; the four texts are required, country/category/pair_id optional.
        where: a location used in error messages, such as ``"train.jsonl:17"``.

    Returns:
        A dict with the required fields as stripped strings and the optional fields that were given.

    Raises:
        RecordError: a required field is missing, not a string, or blank.
    """
    clean = {}
    for field in schema.REQUIRED_TEXT_FIELDS:
        if field not in meta or meta[field] is None:
            raise RecordError(f"{where}: missing field {field!r}")
        value = meta[field]
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"{where}: field {field!r} must be a non-empty string, got {value!r}")
        clean[field] = value.strip()
    for field in schema.OPTIONAL_FIELDS:
        if meta.get(field) is not None:
            clean[field] = meta[field]
    return clean


class TwinShardWriter:
    """Write twin pairs into ``out_dir/shard-%06d.tar`` and ``sizes.json`` on close.

    Use as a context manager::

        with TwinShardWriter("shards/train", maxcount=1000) as w:
            w.write("pair0000001", pos_img, neg_img, {"pos_caption": ..., ...})

    Args:
        out_dir: folder for the shards; created if missing.
        maxcount: pairs per shard.
        maxsize: bytes per shard before a new one starts.
        resize: optional shorter-side size for stored images (pre-resized JPEGs train faster).
        max_pixels: pixel cap per image (:mod:`cultureclip.images`); a larger image is refused.
        mtime: the timestamp stamped on every tar member. webdataset's default (a float ``time.time()``)
            makes tarfile add a pax header of about 1 KiB to every member (more than a small JPEG)
            and makes the shards differ from run to run; a fixed integer avoids both.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], maxcount: int = 1000,
                 maxsize: float = 3e9, resize: Optional[int] = None, mtime: int = SHARD_MTIME,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resize, self.max_pixels = resize, max_pixels
        self.sizes: dict[str, int] = {}
        self._keys: set[str] = set()
        self._writer = wds.ShardWriter(str(self.out_dir / schema.SHARD_PATTERN), maxcount=maxcount,
                                       maxsize=maxsize, verbose=0, mtime=int(mtime))

    def write(self, key: str, pos_image: ImageLike, neg_image: ImageLike, meta: Mapping[str, Any]) -> None:
        """Validate and write one pair; writes nothing on bad input.

        Raises:
            RecordError: a bad key or meta. ImageDecodeError: an image that does not decode or is
            over the pixel cap. OSError: an image path that cannot be read.
        """
        if "." in key or not key:
            raise RecordError(f"pair key {key!r} must be non-empty and contain no dot (webdataset splits on it)")
        if key in self._keys:
            raise RecordError(f"duplicate pair key {key!r}")
        meta = validate_pair_meta(meta, where=f"pair {key}")
        # encode both images before writing anything, so a bad image leaves no half-written sample
        pos_bytes, pos_ext = image_to_bytes(pos_image, self.resize, max_pixels=self.max_pixels)
        neg_bytes, neg_ext = image_to_bytes(neg_image, self.resize, max_pixels=self.max_pixels)
        sample = {
            schema.KEY: key,
            f"{schema.POS_PREFIX}.{pos_ext}": pos_bytes,
            f"{schema.NEG_PREFIX}.{neg_ext}": neg_bytes,
            schema.META: json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }
        try:
            self._writer.write(sample)
        except OSError as exc:  # a full disk says only "[Errno 28]": name the shard
            raise_if_disk_full(exc, f"shard {self._writer.fname}")
            raise
        self._keys.add(key)
        name = os.path.basename(self._writer.fname)
        self.sizes[name] = self.sizes.get(name, 0) + 1

    def close(self) -> dict[str, int]:
        """Finish the last shard and write ``sizes.json``; returns the sizes."""
        tmp = self.out_dir / (schema.SIZES_FILE + ".tmp")
        current = getattr(self._writer, "fname", None)  # the shard whose end is flushed now
        try:
            self._writer.close()
            current = tmp
            tmp.write_text(json.dumps(self.sizes, indent=1, sort_keys=True))
        except OSError as exc:
            raise_if_disk_full(exc, f"shard {current}" if current != tmp else str(tmp))
            raise
        os.replace(tmp, self.out_dir / schema.SIZES_FILE)
        return self.sizes

    def __enter__(self) -> "TwinShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_sizes(shard_dir: Union[str, os.PathLike]) -> dict[str, int]:
    """Read ``sizes.json`` next to the shards (``{shard name: pairs}``)."""
    path = Path(shard_dir) / schema.SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: shards written by cultureclip carry it; "
                                f"give the number of pairs explicitly otherwise")
    return json.loads(path.read_text())
