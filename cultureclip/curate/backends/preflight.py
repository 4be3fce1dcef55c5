"""One tiny request before a stage's first real one, so that a wrong server, model or key stops the run
in a second, saying so, instead of turning every job into an error after its retries and backoff.

The request is a one-token chat completion (``max_tokens=1``, no response format): every
OpenAI-compatible server answers it, and it goes through the same URL, model and key as the real
requests. Answers that a fault of the moment explains (429, 5xx, a timeout) do not stop the run: the
jobs' own retries deal with them. A server that cannot be reached at all, a 4xx (no such model, wrong
path, bad key) or an answer that is not a chat completion stop it, with the URL, the model and what the
server said (scrubbed of the key, bounded).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from cultureclip.curate.backends.deadline import request_deadline

log = logging.getLogger(__name__)
PREFLIGHT_TIMEOUT_S = 30.0
RETRYABLE_STATUS = {408, 409, 425, 429}  # plus every 5xx (as for the real requests)


class ChatServerError(RuntimeError):
    """The chat server, model or key of a stage's settings does not work (found before any job ran)."""


def preflight(client: Any, base_url: str, model: str, timeout_s: float, scrub: Callable[[str], str]) -> None:
    """Send one tiny completion through ``client`` (an ``openai.OpenAI``); raise :class:`ChatServerError`
    if the server, the model or the key is wrong.

    Args:
        client: the OpenAI SDK client the real requests use.
        base_url, model: what the settings name (for the message).
        timeout_s: the request's total deadline (capped at :data:`PREFLIGHT_TIMEOUT_S`).
        scrub: cleans server text for the message (the key removed, the length bounded).
    """
    import openai
    from openai.types.chat import ChatCompletion
    fix = "check chat.base_url / chat.model (or the stage's <stage>.chat.*), the key variable and that the server runs"
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1, "temperature": 0}
    try:
        with request_deadline(min(float(timeout_s), PREFLIGHT_TIMEOUT_S)):
            answer = client.post("/chat/completions", cast_to=ChatCompletion, body=body)
    except openai.APITimeoutError:
        log.warning("chat preflight: %s did not answer within %.0f s; starting anyway (jobs retry)", base_url,
                    min(float(timeout_s), PREFLIGHT_TIMEOUT_S))
        return
    except openai.APIConnectionError as exc:
        raise ChatServerError(f"cannot reach the chat server {base_url} (model {model!r}): {scrub(exc)}; {fix}") from None
    except openai.APIStatusError as exc:
        status = exc.status_code
        if status in RETRYABLE_STATUS or status >= 500:
            log.warning("chat preflight: %s answered HTTP %d; starting anyway (jobs retry)", base_url, status)
            return
        raise ChatServerError(f"the chat server {base_url} refused model {model!r}: HTTP {status}: "
                              f"{scrub(exc.message)}; {fix}") from None
    except (openai.OpenAIError, ValueError) as exc:
        raise ChatServerError(f"the chat server {base_url} (model {model!r}) gave an unreadable answer: "
                              f"{scrub(exc)}; {fix}") from None
    if not isinstance(answer, ChatCompletion) or not isinstance(answer.choices, list):
        raise ChatServerError(f"the chat server {base_url} (model {model!r}) did not answer with a chat completion: "
                              f"{scrub(str(answer))}; is {base_url} an OpenAI-compatible root (…/v1)?")
