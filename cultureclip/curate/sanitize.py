"""Whatever a server answers is data: scrub secrets out of it, bound its length, escape it for its format.

A buggy or hostile server may quote the caller's API key back inside a valid answer, send a reason of
50 kB, or put Markdown or HTML in a field that a report pastes into a table. The chat client scrubs
every string of every answer and error (:func:`scrub_tree`, :func:`scrub`) with the secrets registered
here (:func:`register_secret`, done by each client for its key), so records, errors, cards and logs
never hold a key; the writers escape what they paste (:func:`markdown_cell`, :func:`html_text`,
:func:`csv_cell`). :class:`SecretFilter` scrubs log records, for entry points to install on their
handlers.
"""
from __future__ import annotations

import html
import logging
import re
import threading
from typing import Any, Iterable, Optional

REDACTED = "***"
MAX_TEXT = 2000  # characters of server text kept in an error message
MAX_CELL = 300  # characters of server text kept in one table cell of a report
_secrets: set[str] = set()
_lock = threading.Lock()
MIN_SECRET = 4  # shorter "keys" (e.g. a placeholder) would scrub ordinary words


def register_secret(secret: Optional[str]) -> None:
    """Scrub ``secret`` from every string this module cleans from now on (in this process)."""
    if secret and len(secret) >= MIN_SECRET:
        with _lock:
            _secrets.add(secret)


def scrub(text: Any, secrets: Iterable[str] = ()) -> str:
    """``str(text)`` with every registered secret (and every one of ``secrets``) replaced by ``***``."""
    text = str(text)
    with _lock:
        known = set(_secrets)
    for secret in sorted(known.union(s for s in secrets if s and len(s) >= MIN_SECRET), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def scrub_tree(value: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with every string scrubbed; keys too."""
    secrets = tuple(secrets)
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets) if isinstance(k, str) else k: scrub_tree(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_tree(v, secrets) for v in value]
    return value


def bound(text: Any, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [{len(text) - limit} more characters]"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~!])")  # what is active inside a table cell (< > & are HTML-escaped)


def markdown_cell(text: Any, limit: int = MAX_CELL) -> str:
    """Server or user text made inert in one Markdown table cell: scrubbed, bounded, on one line, with
    Markdown punctuation backslash-escaped (a ``|`` cannot end the cell, a ``#`` cannot start a heading)
    and HTML escaped (no tag or entity of its own)."""
    text = " ".join(bound(scrub(text), limit).split())  # newlines would end the table row
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=True))


def html_text(text: Any, limit: int = MAX_CELL) -> str:
    """Server text for an HTML page: scrubbed, bounded and escaped."""
    return html.escape(bound(scrub(text), limit), quote=True)


def csv_cell(text: Any, limit: int = MAX_CELL) -> str:
    """Server text for a CSV cell (the csv module quotes it): scrubbed, bounded, and prefixed with ``'``
    when it starts like a spreadsheet formula (``= + - @``)."""
    text = bound(scrub(text), limit)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


class SecretFilter(logging.Filter):
    """Scrubs registered secrets from log records (message and arguments) before any handler writes them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _secrets:
            record.msg = scrub(record.getMessage())
            record.args = None
        return True


def install_log_filter(logger: Optional[logging.Logger] = None) -> None:
    """Add a :class:`SecretFilter` to every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())
