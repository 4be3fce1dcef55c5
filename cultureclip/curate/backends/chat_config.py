"""The settings of a chat backend (:class:`ChatConfig`) and how a run's settings combine with a stage's.

Holds no secret: the key comes from the environment variable named by ``api_key_env``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional


def sampling_settings(settings: Mapping) -> dict:
    """What in a chat config changes the answers (and so belongs in a job's key): the temperature and the
    extra request fields (``top_k``, ``top_p``, ``seed``, ...). Never concurrency, timeouts or attempts."""
    return {"temperature": float(settings.get("temperature", 0.0) or 0.0),
            "extra_body": dict(settings.get("extra_body") or {})}


@dataclass
class ChatConfig:
    """Where and how to ask. Holds no secret: the key comes from the variable ``api_key_env``.

    Attributes:
        base_url: the server's OpenAI-compatible root, e.g. ``http://localhost:8000/v1``.
        model: the model id the server serves.
        api_key_env: the environment variable holding the API key; local servers need none (the
            placeholder ``"EMPTY"`` is sent when it is unset).
        concurrency: requests in flight at most (:meth:`ChatClient.ask_many`).
        rate_limit: requests per second at most (retries included); ``None`` for no limit.
        timeout_s: seconds per HTTP request in all (connect, sending, and every byte of the answer).
        max_attempts: tries per request in all (the first included).
        temperature, max_tokens: sampling settings.
        extra_body: extra JSON fields for the server (e.g. vLLM's ``top_k``).
        backoff_s, max_backoff_s: exponential backoff between tries (with jitter) when the server
            sends no ``Retry-After``.
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    rate_limit: Optional[float] = None
    timeout_s: float = 60.0
    max_attempts: int = 4
    temperature: float = 0.0
    max_tokens: int = 512
    extra_body: Optional[dict] = None
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        """Refuse bad settings here, before any request: a server must never be blamed for them."""
        def number(name: str, low: float, kind: type = float, strict: bool = False, null: bool = False) -> None:
            value = getattr(self, name)
            if value is None and null:
                return
            try:
                ok = not isinstance(value, bool) and math.isfinite(float(value)) and float(value) == kind(value)
            except (TypeError, ValueError):
                ok = False
            if not ok or (float(value) <= low if strict else float(value) < low):
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"chat setting {name} must be {what} {'>' if strict else '>='} {low:g}"
                                 f"{' or null' if null else ''}, got {value!r}: fix chat.{name} (or the stage's "
                                 f"<stage>.chat.{name})")

        number("concurrency", 1, int)
        number("max_attempts", 1, int)
        number("max_tokens", 1, int)
        number("timeout_s", 0, strict=True)
        number("rate_limit", 0, strict=True, null=True)
        number("temperature", 0)
        number("backoff_s", 0)
        number("max_backoff_s", 0)
        for name in ("base_url", "model", "api_key_env"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"chat setting {name} must be set (a non-empty string), got {getattr(self, name)!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"chat setting base_url must start with http:// or https://, got {self.base_url!r}")

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "ChatConfig":
        """Build from a mapping (a config group), refusing unknown keys by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown chat settings {unknown}; known: {sorted(known)}")
        data = dict(cfg)
        if data.get("extra_body") is not None:
            data["extra_body"] = dict(data["extra_body"])
        return cls(**data)

    def sampling(self) -> dict:
        """:func:`sampling_settings` of this config (part of every chat job's key)."""
        return sampling_settings(self.__dict__)


def effective_chat(stage: Optional[Mapping[str, Any]], run: Optional[Mapping[str, Any]]) -> dict:
    """A stage's chat settings: the stage's own (its config group's ``chat``), overridden key by key by
    every setting of the run's ``chat`` group that is not null.

    The run's group holds nulls unless the command line (or an experiment) sets a key, so
    ``chat.base_url=...`` reaches every chat stage, ``judge.chat.base_url=...`` only the judge, and the
    stage files keep their own defaults (the text stages' server and model, the judge's VLM).
    """
    return {**dict(stage or {}), **{k: v for k, v in dict(run or {}).items() if v is not None}}
