"""Chat messages: the ``Label: value`` block every prompt carries for its own item, and readers of a
request body (its text, images and answer schema name) for the stand-in answers and the tests.

Pure functions on plain data: no client, no server.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional


def field_block(fields: Mapping[str, Any]) -> str:
    """``Label: value`` lines for one item (lists joined with '; '), the part of a prompt that is its own."""
    lines = []
    for label, value in fields.items():
        if isinstance(value, (list, tuple)):
            value = "; ".join(str(v) for v in value)
        lines.append(f"{label}: {'' if value is None else value}")
    return "\n".join(lines)


def read_block(text: str) -> dict[str, str]:
    """The ``Label: value`` lines of a text, by label (the first occurrence of each)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Z][A-Za-z ]{1,40}): (.*)$", line.strip())
        if m and m.group(1) not in out:
            out[m.group(1)] = m.group(2).strip()
    return out


def system_user(system: str, user: Any) -> list[dict]:
    """A fresh two-message list (built per item: no shared template is ever mutated)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def schema_name(body: Mapping) -> Optional[str]:
    """The JSON schema name of a chat request's ``response_format``, or None."""
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("name")


def request_text(body: Mapping) -> str:
    """All text parts of a chat request's messages, joined by newlines (for responders)."""
    out = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return "\n".join(out)


def request_images(body: Mapping) -> list[str]:
    """The image URLs (data URLs included) of a chat request's messages, in order."""
    return [p["image_url"]["url"] for msg in body.get("messages", []) if isinstance(msg.get("content"), list)
            for p in msg["content"] if p.get("type") == "image_url"]
