"""What travels to and from a chat server: answers, image parts, strict JSON schemas, the rate limit, retries.

Small pieces of :mod:`cultureclip.curate.backends.chat`, kept apart so that the client reads top to bottom.
"""
from __future__ import annotations

import base64
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

RETRYABLE_STATUS = {408, 409, 425, 429}  # plus every 5xx
MAX_RETRY_AFTER_S = 120.0


@dataclass
class ChatAnswer:
    """One request's result: a validated ``value``, or an ``error`` reason with its ``message``."""

    value: Any  # a pydantic model instance, or None on error
    error: Optional[str]
    message: str
    attempts: int

    @property
    def ok(self) -> bool:
        return self.error is None


def image_part(path_or_bytes: Union[str, os.PathLike, bytes], mime: Optional[str] = None) -> dict:
    """A chat content part holding an image as a base64 data URL.

    Args:
        path_or_bytes: an image file, or its bytes.
        mime: the media type; guessed from the magic bytes (PNG, JPEG, WebP, GIF) when omitted.
    """
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    if mime is None:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            mime = "image/png"
        elif data[:3] == b"\xff\xd8\xff":
            mime = "image/jpeg"
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            mime = "image/webp"
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            mime = "image/gif"
        else:
            where = "" if isinstance(path_or_bytes, bytes) else f" {path_or_bytes}"
            raise ValueError(f"image{where}: unknown image format (not PNG/JPEG/WebP/GIF); pass mime=")
    return {"type": "image_url",
            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"}}


def strict_json_schema(model: type) -> dict:
    """The JSON schema of a pydantic model in the strict form structured output wants: every object
    closed (``additionalProperties: false``) and every property required."""
    schema = model.model_json_schema()

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node["additionalProperties"] = False
                node["required"] = list(node["properties"])
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


class TokenBucket:
    """At most ``rate`` acquisitions per second, shared by threads; burst of one (even spacing)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / float(rate)
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:  # reserve a slot, then sleep outside the lock
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            time.sleep(slot - now)


class _Retry(Exception):
    def __init__(self, reason: str, message: str, retry_after: Optional[float] = None,
                 retryable: bool = True) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after, self.retryable = reason, message, retry_after, retryable


def _retry_after(headers: Any) -> Optional[float]:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date), or None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            import email.utils
            parsed = email.utils.parsedate_tz(value)
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
    return None
