"""Job keys: a hash of everything that determines a job's output, computed by the runner only.

A key hashes the stage name, the job's inputs (the exact upstream fields the job reads, so an edit
upstream changes exactly the keys of the jobs that read the edited field: Merkle-style), the content
hashes of any whole upstream records it declares it reads, the *text* of the prompt files it uses
(as its sha256),
the model id and the settings that change the output (seed, sizes, steps, thresholds...). Settings
that do not change the output (batch size, device, concurrency, attempts) are never passed in, so
changing them reuses every finished record.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Optional

KEY_CHARS = 24  # 96 bits of sha256: no collision in any realistic dataset


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same string."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def digest(obj: Any) -> str:
    """The :data:`KEY_CHARS`-character sha256 of a JSON value's canonical form."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:KEY_CHARS]


def job_key(stage: str, inputs: Mapping[str, Any], model: str = "", prompts: Optional[Mapping[str, str]] = None,
            settings: Optional[Mapping[str, Any]] = None, reads: Iterable[str] = ()) -> str:
    """The key of one job (the runner calls this; stages never do).

    Args:
        stage: the stage name (keys of different stages never collide).
        inputs: the job's own data: every upstream field it reads, JSON-serialisable.
        model: the backend's model id ("" when no model is involved).
        prompts: ``{prompt file name: sha256 of its text}`` of the prompts the job uses.
        settings: the settings that change the output.
        reads: content hashes of whole upstream records the job reads (order does not matter).
    """
    return digest({"stage": stage, "inputs": inputs, "model": model, "prompts": dict(prompts or {}),
                   "settings": dict(settings or {}), "reads": sorted(reads)})


def seed_from_key(key: str) -> int:
    """A generator seed (0 <= seed < 2**63) derived from a record key."""
    return int(hashlib.sha256(("seed:" + key).encode()).hexdigest()[:16], 16) >> 1


def unit_hash(*parts: Any) -> float:
    """A number in [0, 1) from a hash of ``parts``: the same parts always give the same number."""
    return int(hashlib.sha256(canonical_json(list(parts)).encode("utf-8")).hexdigest()[:15], 16) / 16 ** 15


def in_val(twin_id: str, seed: int, fraction: float) -> bool:
    """The split rule: a twin pair is in val iff ``unit_hash("split", seed, twin_id) < fraction``.

    It depends only on the pair's own id and the split seed, so adding or removing other twin pairs
    never moves a pair between train and val (and raising the fraction only moves pairs into val).
    """
    return unit_hash("split", int(seed), str(twin_id)) < float(fraction)
