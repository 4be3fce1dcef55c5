"""Text embeddings for the upstream curation stages (dedup, twin mining), L2-normalised ``[N, D]``.

Backends (config ``embedding.backend``):

- ``open_clip``: the text tower of a CultureCLIP / open_clip model (``model``: architecture, ``hf-hub:``
  id or saved folder; ``pretrained``: tag or weights file). The default.
- ``openai``: an OpenAI-compatible ``/v1/embeddings`` endpoint (``base_url``, ``model``, API key from
  the environment variable ``api_key_env``).
- ``ngram``: hashed character 3-gram counts of the normalised text (``dim`` buckets; no model, no
  download). A lexical embedding: good at spelling variants ("Kimono"/"Kimonos"), blind to meaning;
  the demo and the tests use it.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from cultureclip.curate.stages import upstream as up
from cultureclip.progress import Progress, track

BACKENDS = ("open_clip", "openai", "ngram")


def embedding_id(cfg: Mapping) -> str:
    """What the embeddings depend on, for a stage's settings."""
    backend = cfg.get("backend", "open_clip")
    if backend == "ngram":
        return f"ngram:3:{int(cfg.get('dim', 1024))}"
    return f"{backend}:{cfg.get('model')}:{cfg.get('pretrained')}"


def _ngram(texts: Sequence[str], dim: int, desc: str) -> torch.Tensor:
    out = np.zeros((len(texts), dim), dtype=np.float32)  # [N, D]
    for i, text in enumerate(track(texts, desc, unit="texts", summary=False)):
        padded = f" {up.normalize_name(text)} "
        for j in range(len(padded) - 2):
            h = int.from_bytes(hashlib.blake2b(padded[j:j + 3].encode(), digest_size=8).digest(), "little")
            out[i, h % dim] += 1.0 if (h >> 63) == 0 else -1.0  # signed hashing: collisions cancel on average
    norms = np.linalg.norm(out, axis=1, keepdims=True)  # [N, 1]
    if (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise ValueError(f"text {texts[bad]!r} has no letters or digits to embed")
    return torch.from_numpy(out / norms)


def _openai(texts: Sequence[str], cfg: Mapping, desc: str) -> torch.Tensor:
    try:
        import openai
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the openai embedding backend needs: pip install 'cultureclip[curate]'") from exc
    env = cfg.get("api_key_env", "OPENAI_API_KEY")
    client = openai.OpenAI(base_url=cfg["base_url"], api_key=os.environ.get(env) or "EMPTY",
                           timeout=float(cfg.get("timeout_s", 60)), max_retries=int(cfg.get("max_attempts", 4)))
    feats = []
    with Progress(desc, total=len(texts), unit="texts", summary=False) as bar:
        for batch in up.chunked(texts, int(cfg.get("batch_size", 256))):
            resp = client.embeddings.create(model=cfg["model"], input=batch)
            feats.extend(d.embedding for d in sorted(resp.data, key=lambda d: d.index))
            bar.update(len(batch))
    x = torch.tensor(feats, dtype=torch.float32)  # [N, D]
    return torch.nn.functional.normalize(x, dim=-1)


def _open_clip(texts: Sequence[str], cfg: Mapping, desc: str) -> torch.Tensor:
    from cultureclip.eval.embed import embed_texts
    from cultureclip.model import CultureCLIP
    device = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = CultureCLIP.from_pretrained(cfg["model"], pretrained=cfg.get("pretrained"), device=device)
    return embed_texts(model, list(texts), batch_size=int(cfg.get("batch_size", 256)), progress=desc)


def embed(texts: Sequence[str], cfg: Mapping, desc: str = "text embeddings") -> torch.Tensor:
    """L2-normalised float32 features ``[N, D]`` of ``texts`` with the configured backend.

    ``desc`` names the work in its progress bar or lines (:mod:`cultureclip.progress`).
    """
    cfg = up.plain(cfg or {})
    backend = cfg.get("backend", "open_clip")
    if backend not in BACKENDS:
        raise ValueError(f"embedding.backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not texts:
        raise ValueError("nothing to embed (no concepts)")
    if backend == "ngram":
        return _ngram(texts, int(cfg.get("dim", 1024)), desc)
    if not cfg.get("model"):
        raise ValueError(f"embedding.backend={backend} needs embedding.model")
    return _openai(texts, cfg, desc) if backend == "openai" else _open_clip(texts, cfg, desc)


def search_groups(feats: torch.Tensor, groups: Sequence[Any], k: int) -> dict[int, list[tuple[int, float]]]:
    """Up to ``k`` nearest neighbours of every row among the other rows of its own group (FAISS, exact).

    Returns ``{row: [(other_row, cosine), ...]}``, best first.
    """
    from cultureclip.eval.retrieval import build_index
    by_group: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    out: dict[int, list[tuple[int, float]]] = {}
    for rows in by_group.values():
        if len(rows) < 2:
            out.update({r: [] for r in rows})
            continue
        index = build_index(feats[rows], kind="flat", use_gpu=False)
        scores, idx = index.search(feats[rows], min(k + 1, len(rows)))  # [n, k+1]: +1 for the row itself
        for qi, r in enumerate(rows):
            out[r] = [(rows[j], float(s)) for s, j in zip(scores[qi].tolist(), idx[qi].tolist())
                      if rows[j] != r][:k]
    return out
