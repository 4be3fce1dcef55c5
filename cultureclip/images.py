"""The one place that opens an image: decoding, the pixel cap, 8-bit RGB conversion, the error type
and the skip counter. Data (shards, converter, pipeline), evaluation and tools all go through here.

Decoding rules, the same on every path:

* **Pixel cap.** The size an image file declares in its header is checked against ``max_pixels``
  (default :data:`DEFAULT_MAX_PIXELS`, 50 MP) *before* any pixel is decoded, so a 20000x20000 PNG
  costs nothing. Pillow's own decompression-bomb limit (~179 MP) still applies on top and is reported
  the same way. ``max_pixels=None`` leaves only Pillow's limit.
* **8-bit RGB.** Every image becomes 8-bit RGB with one rule per mode: 16-bit samples (``I;16*``,
  and ``I``, which Pillow uses for 16-bit PGM/TIFF) keep their high byte, ``v >> 8``, the same rule
  Pillow applies to 16-bit RGB(A) PNGs; values of ``I`` outside 0..65535 are clipped first. Float
  images (``F``) are read as 0..1 and mapped to ``round(v * 255)`` (clipped, NaN -> 0). Images with
  transparency (an alpha channel, or a palette/gray ``transparency`` entry) are composited over
  white: ``round((c * a + 255 * (255 - a)) / 255)``. Every other mode uses Pillow's ``convert("RGB")``.
  A plain ``convert("RGB")`` would clip 16-bit values to 255, i.e. a white picture.
* **Errors.** A file that cannot be used raises :class:`ImageDecodeError` (a ``ValueError``) whose
  message names the source (a path, or e.g. "shard.tar sample pair7 member pos.jpg"); ``reason`` is
  :data:`BAD_IMAGE` or, for :class:`ImageTooLargeError`, :data:`TOO_LARGE`. Callers choose between
  ``on_error="raise"`` and ``"skip"``; skipped items go into a :class:`SkipCounter`.
"""
from __future__ import annotations

import io
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # well under Pillow's warning (89 MP) and error (179 MP) limits
ON_ERROR = ("raise", "skip")
BAD_IMAGE = "bad_image"  # the bytes do not decode as an image
TOO_LARGE = "too_large"  # the header declares more than max_pixels pixels
# what Pillow's plugins raise on corrupt or truncated data; TypeError etc. are bugs and propagate
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error, ZeroDivisionError,
               Image.DecompressionBombError)
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
ImageSource = Union[Image.Image, bytes, bytearray, memoryview, str, os.PathLike, Mapping]


class ImageDecodeError(ValueError):
    """An image could not be used; the message names its source.

    Attributes:
        reason: :data:`BAD_IMAGE` (or :data:`TOO_LARGE` for :class:`ImageTooLargeError`).
        detail: the cause without the source, e.g. ``"UnidentifiedImageError: cannot identify ..."``.
    """

    reason = BAD_IMAGE

    def __init__(self, message: str, detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.detail = detail if detail is not None else message


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than the cap allows (checked before decoding)."""

    reason = TOO_LARGE


def check_on_error(on_error: str) -> None:
    """Raise ValueError unless ``on_error`` is ``"raise"`` or ``"skip"``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def source_name(source: Any) -> str:
    """A short name for messages: the path, or what kind of in-memory image it is."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Mapping):
        return str(source.get("path") or "<image bytes>")
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{len(source)} bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else repr(source)


def _fail(cls, name: str, detail: str):
    return cls(f"{name}: {'image too large' if cls is ImageTooLargeError else 'cannot decode image'}: {detail}",
               detail)


def check_size(size: tuple[int, int], max_pixels: Optional[int], name: str) -> None:
    """Raise :class:`ImageTooLargeError` when ``width * height > max_pixels`` (None: no cap)."""
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise _fail(ImageTooLargeError, name, f"ImageTooLargeError: {size[0]}x{size[1]} = "
                                              f"{size[0] * size[1]} pixels, more than the cap of {max_pixels}")


def open_image(source: ImageSource, name: Optional[str] = None,
               max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and check its declared size against the cap.

    Args:
        source: encoded bytes, a path, a PIL image, or a Hugging Face image dict ``{"bytes", "path"}``.
        name: how messages name the source (default :func:`source_name`).
        max_pixels: the pixel cap; None: only Pillow's own limit.

    Returns:
        The PIL image, pixels not decoded yet (a PIL image given in is returned as is).

    Raises:
        ImageTooLargeError: over the cap. ImageDecodeError: not an image, or a dict without data.
        TypeError: an unsupported source type (a bug, not bad data).
    """
    name = name or source_name(source)
    if isinstance(source, Mapping):  # Hugging Face Image(decode=False) / parquet export
        data = source.get("bytes") if source.get("bytes") is not None else source.get("path")
        if data is None:  # a row whose image is missing: data, not a bug
            raise _fail(ImageDecodeError, name, "ValueError: image dict has neither 'bytes' nor 'path'")
        source = data
    if not isinstance(source, (Image.Image, bytes, bytearray, memoryview, str, os.PathLike)):
        raise TypeError(f"unsupported image source of type {type(source).__name__}")
    try:
        if isinstance(source, Image.Image):
            image = source
        elif isinstance(source, (str, os.PathLike)):
            image = Image.open(io.BytesIO(Path(source).read_bytes()))  # read first: no lingering file handle
        else:
            image = Image.open(io.BytesIO(bytes(source)))
    except Image.DecompressionBombError as exc:  # Pillow's own limit, also a size refusal
        raise _fail(ImageTooLargeError, name, f"{type(exc).__name__}: {exc}") from exc
    except _PIL_ERRORS as exc:
        raise _fail(ImageDecodeError, name, f"{type(exc).__name__}: {exc}") from exc
    check_size(image.size, max_pixels, name)
    return image


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB by the rules in the module docstring (high byte of 16-bit, 0..1 floats, alpha over white)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit gray: scale, never clip
        values = np.asarray(image)
        if image.mode == "F":
            gray = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255)
        else:
            gray = np.clip(values.astype(np.int64), 0, 65535) >> 8
        return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA")).astype(np.uint32)  # [H, W, 4]
        alpha = rgba[..., 3:]
        rgb = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255  # = round(x / 255) for integer x
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    return image.convert("RGB")


def decode_image(source: ImageSource, name: Optional[str] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image fully into 8-bit RGB (truncated files fail here, not later).

    Args:
        source, name, max_pixels: as in :func:`open_image`.

    Returns:
        A loaded ``RGB`` PIL image.

    Raises:
        ImageDecodeError / ImageTooLargeError naming the source; TypeError for an unsupported type.
    """
    name = name or source_name(source)
    image = open_image(source, name, max_pixels)
    try:
        image.load()
        return to_rgb8(image)
    except _PIL_ERRORS as exc:
        raise _fail(ImageDecodeError, name, f"{type(exc).__name__}: {exc}") from exc


def image_to_bytes(image: Union[Image.Image, bytes, str, os.PathLike], resize: Optional[int] = None,
                   quality: int = 95, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                   name: Optional[str] = None) -> tuple[bytes, str]:
    """Encoded file bytes and their extension ``(bytes, "jpg" | "png" | "webp")`` for one image.

    Bytes or a path that already hold a JPEG/PNG/WebP are returned untouched (after a full test
    decode) unless ``resize`` is set; anything else is converted to 8-bit RGB (:func:`to_rgb8`) and
    encoded as JPEG. ``resize`` shrinks the shorter side to that many pixels (never enlarges).

    Raises:
        ImageDecodeError / ImageTooLargeError naming the source: no blank image is ever substituted.
    """
    raw = None
    if isinstance(image, (str, os.PathLike)):
        raw = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray)):
        raw = bytes(image)
    name = name or source_name(image)
    opened = open_image(image if raw is None else raw, name, max_pixels)
    ext = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get((opened.format or "").lower())
    rgb = decode_image(opened, name, max_pixels)
    if raw is not None and ext is not None and resize is None:
        return raw, ext
    if resize is not None and min(rgb.size) > resize:
        scale = resize / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


class SkipCounter:
    """Counts skipped items by reason and logs them without flooding the log.

    The first ``log_first`` skips are logged one line each (with where and why); after that a summary
    line (counts by reason and the latest example) is logged every ``log_every`` skips or
    ``log_interval`` seconds, whichever comes first, and by :meth:`flush` at the end.

    In a data pipeline it travels into every DataLoader worker, so each worker counts on its own copy:
    the caller's object is exact for ``num_workers=0`` only (the pipeline sums ``N_SKIPPED`` instead).
    """

    def __init__(self, log_first: int = 10, log_every: int = 1000, log_interval: float = 30.0,
                 logger: Optional[logging.Logger] = None) -> None:
        self.by_reason: dict[str, int] = {}
        self.log_first, self.log_every, self.log_interval = log_first, log_every, log_interval
        self.logger = logger or log
        self.example = ""
        self._reported = 0  # for take_unreported
        self._unlogged = 0
        self._last_log = time.monotonic()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, where: str, detail: str = "", count: int = 1, force_log: bool = False) -> None:
        """Count ``count`` skipped items for ``reason``; ``where`` names them (file:line, shard and key).

        ``force_log`` logs this one on its own line even past ``log_first`` (a whole damaged shard,
        rare and worth naming, must not disappear into a summary of bad samples).
        """
        self.by_reason[reason] = self.by_reason.get(reason, 0) + count
        self.example = f"{where} ({reason}): {detail}" if detail else f"{where} ({reason})"
        if force_log or self.total <= self.log_first:
            self.logger.warning("skipped %s", self.example)
            self._last_log = time.monotonic()
            return
        self._unlogged += count
        if self._unlogged >= self.log_every or time.monotonic() - self._last_log >= self.log_interval:
            self.flush()

    def flush(self) -> None:
        """Log a summary of the skips not logged yet (if any)."""
        if self._unlogged:
            self.logger.warning("skipped %d more (total %d: %s); latest: %s", self._unlogged, self.total,
                                ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason.items())), self.example)
            self._unlogged = 0
        self._last_log = time.monotonic()

    def take_unreported(self) -> int:
        """Skips since the previous call (the next batch's ``N_SKIPPED``)."""
        new, self._reported = self.total - self._reported, self.total
        return new
