"""The captions stage's request, answer schema and stand-in answers.

Each request is built from one concept alone (a fresh message list), with the captions and scenes
that concept already has, so that a follow-up request asks only for what is missing.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from cultureclip import schema
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.prompts import load as load_prompt

PROMPTS = ("captions_system", "captions")  # prompt files; their text is in the keys


def caption_schema() -> type:
    """The pydantic answer schema ``CaptionSet``."""
    from pydantic import BaseModel

    class CaptionItem(BaseModel):
        caption: str
        scene: str

    class CaptionSet(BaseModel):
        captions: list[CaptionItem]

    return CaptionSet


def caption_messages(concept: Mapping, count: int, have: Sequence[str], scenes: Sequence[str]) -> list[dict]:
    """Ask for ``count`` more captions of one concept, none repeating ``have`` or a scene in ``scenes``."""
    user = (load_prompt("captions").format(count=count) + "\n\n"
            + up.field_block({"Concept": concept[schema.CONCEPT], "Native name": concept.get(schema.NATIVE_NAME) or "",
                              "Country": concept.get(schema.COUNTRY) or "", "Category": concept[schema.CATEGORY],
                              "Context": concept.get(schema.CONTEXT) or "",
                              "Features": concept.get(schema.FEATURES) or [], "Count": count,
                              "Used scenes": list(scenes), "Already written": list(have)}))
    return up.system_user(load_prompt("captions_system"), user)


def standin_responders() -> dict:
    """Deterministic stand-in captions: "<concept> with <feature> at <scene>", over the demo's scenes not
    yet used. A first request (no captions yet) also carries a duplicate and a too-long caption, so a
    second request is needed; the demo table's ``caption_fail`` concepts only ever get too-long ones."""
    world = up.load_demo_world()

    def respond(request: Mapping) -> dict:
        f = up.read_block(up.request_text(request))
        name, count = f.get("Concept", ""), int(f.get("Count", "0"))
        features = [x.strip() for x in f.get("Features", "").split(";") if x.strip()] or ["its usual look"]
        used = {x.strip() for x in f.get("Used scenes", "").split(";") if x.strip()}
        free = [s for s in world["scenes"] if s not in used]
        out = []
        for i in range(count):
            scene = free[i % len(free)] if free else "a plain background"
            out.append({schema.CAPTION: f"{name} with {features[i % len(features)]} at {scene}", schema.SCENE: scene})
        if name in world["caption_fail"]:
            out = [{**c, schema.CAPTION: c[schema.CAPTION] + " in soft golden evening light seen from a distance "
                                                             "by many curious visitors"} for c in out]
        elif not used and len(out) >= 3:
            out[1] = {**out[0]}  # a duplicate
            out[2] = {**out[2], schema.CAPTION: out[2][schema.CAPTION] + " on a long and very busy afternoon with "
                                                                         "friends and family nearby"}
        return {schema.CAPTIONS: out}

    return {"CaptionSet": respond}
