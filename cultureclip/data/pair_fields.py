"""The optional fields of a twin pair row, read one way by the shard converter and the curation importer.

Contexts and features of both sides, and the category (at the top level or under ``metadata``), with
the rules the reference files need: features may be a list of strings or one string (kept whole as a
one-element list: the reference files hold free text and any split would be a guess), blank counts as
absent, and two places that both give a value must agree. Errors are :class:`RecordError` naming the
row and the field.
"""
from __future__ import annotations

from typing import Mapping, Optional

from cultureclip import schema
from cultureclip.data.shards import RecordError

SIDES = (schema.POS_PREFIX, schema.NEG_PREFIX)
# per side: (concept, country, context, features, captions) field of our record
SIDE_FIELDS = {
    schema.POS_PREFIX: (schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CONTEXT, schema.POS_FEATURES,
                        schema.POS_CAPTIONS),
    schema.NEG_PREFIX: (schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CONTEXT, schema.NEG_FEATURES,
                        schema.NEG_CAPTIONS),
}

def text_field(row: Mapping, name: str, where: str, required: bool = True) -> Optional[str]:
    """A stripped non-empty string, or None for an absent optional field (blank counts as absent)."""
    value = row.get(name)
    if value is None or (not required and isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def features_field(row: Mapping, name: str, where: str) -> list[str]:
    """Visual features as a list of strings: a list is kept (blank items dropped), a string becomes
    a one-element list, absent or blank gives ``[]``."""
    value = row.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise RecordError(f"{where}: field {name!r} must be a string or a list of strings, got {value!r}")


def category_field(row: Mapping, where: str, required: bool = True) -> Optional[str]:
    """The category, at the top level or under ``metadata`` (both given: they must agree)."""
    meta = row.get(schema.REF_METADATA)
    if meta is not None and not isinstance(meta, dict):
        raise RecordError(f"{where}: field {schema.REF_METADATA!r} must be an object, got {meta!r}")
    top = text_field(row, schema.CATEGORY, where, required=False)
    nested = text_field(meta, schema.CATEGORY, f"{where}: {schema.REF_METADATA}", required=False) if meta else None
    if top is not None and nested is not None and top != nested:
        raise RecordError(f"{where}: field {schema.CATEGORY!r} is {top!r} but "
                          f"{schema.REF_METADATA}.{schema.CATEGORY} is {nested!r}")
    value = top if top is not None else nested
    if value is None and required:
        raise RecordError(f"{where}: missing field {schema.CATEGORY!r} (top level or under {schema.REF_METADATA!r})")
    return value


def side_extras(row: Mapping, where: str) -> dict:
    """Contexts and features of both sides; features may also sit under ``metadata``."""
    meta = row.get(schema.REF_METADATA) if isinstance(row.get(schema.REF_METADATA), dict) else {}
    out = {}
    for side in SIDES:
        _, _, context, features, _ = SIDE_FIELDS[side]
        out[context] = text_field(row, context, where, required=False)
        source = row if row.get(features) is not None else meta
        out[features] = features_field(source, features, where if source is row else f"{where}: {schema.REF_METADATA}")
    return out


def pair_meta_extras(row: Mapping, where: str) -> dict:
    """The optional shard-json fields of a reference *final* row (with image paths): category (top
    level or under ``metadata``), contexts and features. Absent ones are left out."""
    out = {k: v for k, v in side_extras(row, where).items() if v}
    category = category_field(row, where, required=False)
    if category is not None:
        out[schema.CATEGORY] = category
    return out
