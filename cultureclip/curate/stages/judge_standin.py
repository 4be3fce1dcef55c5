"""The stand-in answers to the judge's requests (demo and tests): derived from the request, not from looking.

Scores come from a hash of the image bytes (about 1 image in 5 fails the pass rule on its scores). The
twin check is blind, so the stand-in knows the answer only when the PNG carries its prompt in a text
chunk (it then picks that concept 7 times in 8); otherwise it is a coin flip seeded by the image.
"""
from __future__ import annotations

import hashlib

from cultureclip import schema
from cultureclip.curate.messages import request_images

SCORES_SCHEMA = "judge_scores_v1"  # the response_format names the judge sends (cultureclip.curate.stages.judge)
TWIN_SCHEMA = "judge_twin_v1"
_STANDIN_SCORES = (1, 2, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 5, 4, 3, 5)  # by a hash byte: P(1) = 1/16 per score


def _standin_scores(body: dict) -> dict:
    digest = hashlib.sha256("".join(request_images(body)).encode()).digest()
    out = {name: _STANDIN_SCORES[digest[i] % 16] for i, name in enumerate(schema.SCORES)}
    return {**out, schema.REASON: "stand-in judge: scores derived from a hash of the image, not from looking"}


def _png_text(data_url: str) -> str:
    """The tEXt chunks of a PNG data URL (e.g. the prompt a renderer stored), lower-cased; "" if none.
    Read from the chunk headers, without decoding the image (the stand-in must stay cheap)."""
    import base64
    import struct
    try:
        data = base64.b64decode(data_url.split(",", 1)[1])
    except ValueError:
        return ""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return ""
    out, pos = [], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"tEXt":
            out.append(data[pos + 8:pos + 8 + length].split(b"\0", 1)[-1].decode("latin-1"))
        elif kind == b"IEND":
            break
        pos += 12 + length
    return " ".join(out).casefold()


def _standin_twin(body: dict) -> dict:
    options = body["response_format"]["json_schema"]["schema"]["properties"][schema.TWIN_CHOICE]["enum"]
    images = request_images(body)
    digest = hashlib.sha256(("twin:" + "".join(images)).encode()).digest()
    text = " ".join(_png_text(url) for url in images)
    named = [o for o in options if o.split(" (")[0].casefold() in text]
    if len(named) == 1:  # the image carries its prompt: pick that concept, wrong 1 time in 8
        return {schema.TWIN_CHOICE: named[0] if digest[0] % 8 else next(o for o in options if o != named[0])}
    return {schema.TWIN_CHOICE: options[digest[0] % len(options)]}


def responders() -> dict:
    """Deterministic answers for the stand-in server (tests, the offline demo). The stand-in does not look
    at the pixels: scores come from a hash of the image bytes (about 1 image in 5 fails the rule on its
    scores). The twin check is blind, so the stand-in knows the answer only when the PNG carries its
    prompt in a text chunk (it then picks that concept 7 times in 8); otherwise it is a coin flip seeded
    by the image."""
    return {SCORES_SCHEMA: _standin_scores, TWIN_SCHEMA: _standin_twin}
