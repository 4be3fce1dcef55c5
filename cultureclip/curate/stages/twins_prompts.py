"""The twins stage's requests (candidate proposal, verification), answer schemas and stand-in answers.

Every request is built from its own concept (and candidate) alone: a fresh message list per request,
with that item's fields in a ``Label: value`` block.
"""
from __future__ import annotations

import hashlib
import re
from typing import Mapping

from cultureclip import schema
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.prompts import load as load_prompt

TWIN_FIELDS = (schema.CONCEPT, schema.NATIVE_NAME, schema.COUNTRY, schema.CATEGORY, schema.CONTEXT, schema.FEATURES)
PROMPTS = ("twins_system", "twins_candidates", "twins_verdict")  # prompt files; their text is in the keys


def schemas() -> tuple[type, type]:
    """The pydantic answer schemas (``TwinCandidates``, ``TwinVerdict``)."""
    from pydantic import BaseModel, Field

    class TwinCandidate(BaseModel):
        concept: str
        native_name: str
        country: str
        context: str
        features: list[str]

    class TwinCandidates(BaseModel):
        twins: list[TwinCandidate]

    class TwinVerdict(BaseModel):
        visually_similar: bool
        culturally_distinct: bool
        exists: bool
        similarity: int = Field(ge=1, le=5)
        reason: str

    return TwinCandidates, TwinVerdict


def _block(c: Mapping, suffix: str = "") -> dict:
    return {f"Concept{suffix}": c[schema.CONCEPT], f"Native name{suffix}": c.get(schema.NATIVE_NAME) or "",
            f"Country{suffix}": c.get(schema.COUNTRY) or "", f"Context{suffix}": c.get(schema.CONTEXT) or "",
            f"Features{suffix}": c.get(schema.FEATURES) or []}


def candidate_messages(pos: Mapping, k: int) -> list[dict]:
    """Ask for ``k`` twins of one concept."""
    user = (load_prompt("twins_candidates").format(k=k) + "\n\n"
            + up.field_block({**_block(pos), "Category": pos[schema.CATEGORY], "Count": k}))
    return up.system_user(load_prompt("twins_system"), user)


def verdict_messages(pos: Mapping, cand: Mapping) -> list[dict]:
    """Ask the three verifier questions about one (concept, candidate) pair."""
    user = (load_prompt("twins_verdict") + "\n\n"
            + up.field_block({"Category": pos[schema.CATEGORY], **_block(pos, " A"), **_block(cand, " B")}))
    return up.system_user(load_prompt("twins_system"), user)


# ---------------------------------------------------------------------------- stand-in answers
STOP = {"with", "and", "the", "of", "on", "in", "a", "an", "at", "top", "each", "under"}


def _words(features: str) -> set:
    return {w for w in re.findall(r"[a-z]+", features.casefold()) if w not in STOP and len(w) > 2}


def standin_responders() -> dict:
    """Deterministic stand-in answers from the demo table: proposals include an invented item (fails
    ``exists``) and may include a same-country one (rejected by rule); the verdict is computed from the
    two concepts' table entries and shared feature words."""
    world = up.load_demo_world()
    known = {(up.normalize_name(c[schema.CONCEPT]), key.split("|")[0]): (key.split("|")[1], c)
             for key, cell in world["concepts"].items() for c in cell}

    def candidates(request: Mapping) -> dict:
        f = up.read_block(up.request_text(request))
        name, country, cat, k = f.get("Concept", ""), f.get("Country", ""), f.get("Category", ""), int(f["Count"])
        found = [dict(t) for t in world["twins"].get(name, [])]
        if not found:
            pool = [{**c, schema.COUNTRY: n[1]} for n, (ccat, c) in sorted(known.items())
                    if ccat == cat and n[1] != country]
            pool.sort(key=lambda c: hashlib.sha256(f"{name}|{c[schema.CONCEPT]}".encode()).hexdigest())
            found = pool[:max(k - 1, 0)] + [{schema.CONCEPT: f"{name} fusion bowl", schema.NATIVE_NAME: "",
                                             schema.COUNTRY: "United States", schema.CONTEXT: "a novelty item",
                                             schema.FEATURES: ["mixed toppings"]}]
        return {schema.TWINS: [{k2: t.get(k2) or ("" if k2 != schema.FEATURES else []) for k2 in
                                (schema.CONCEPT, schema.NATIVE_NAME, schema.COUNTRY, schema.CONTEXT, schema.FEATURES)}
                               for t in found[:k]]}

    def verdict(request: Mapping) -> dict:
        f = up.read_block(up.request_text(request))
        a = (up.normalize_name(f.get("Concept A", "")), f.get("Country A", ""))
        b = (up.normalize_name(f.get("Concept B", "")), f.get("Country B", ""))
        exists = b in known and known[b][0] == f.get("Category")
        distinct = a[1] != b[1] and a[0] != b[0]
        shared = len(_words(f.get("Features A", "")) & _words(f.get("Features B", "")))
        sim = max(1, min(5, 2 + shared)) if exists else 1
        return {schema.VISUALLY_SIMILAR: shared > 0, schema.CULTURALLY_DISTINCT: distinct, schema.EXISTS: exists,
                schema.SIMILARITY: sim, schema.REASON: f"{shared} shared visual feature words (stand-in)"}

    return {"TwinCandidates": candidates, "TwinVerdict": verdict}
