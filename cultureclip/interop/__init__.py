"""Interoperability with the Hugging Face ecosystem and CLIP_benchmark.

- :mod:`cultureclip.interop.hf_convert`: exact weight and config mapping between ``transformers``'
  ``CLIPModel`` (ViT) and open_clip's ``CLIP`` (pure torch, no ``transformers`` import).
- :mod:`cultureclip.interop.hf_io`: ``CultureCLIP.from_pretrained("hf-transformers:...")`` and
  ``save_pretrained(..., format="transformers")``.
- :mod:`cultureclip.interop.peft_merge`: merge a PEFT LoRA adapter made for a ``CLIPModel``.
- :mod:`cultureclip.interop.hub`: a ``push_to_hub``-ready folder with a model card from ``metrics.json``.

``transformers``, ``peft`` and ``huggingface_hub`` are optional (the ``hf`` extra) and imported only
inside the functions that need them (:func:`require`).
"""
from __future__ import annotations

import importlib
from types import ModuleType

HF_PREFIX = "hf-transformers:"  # CultureCLIP.from_pretrained("hf-transformers:<model id or directory>")


def require(module: str) -> ModuleType:
    """Import an optional dependency of the ``hf`` extra, or raise an ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for Hugging Face interop but could not be imported ({e}); "
                          f"install it with: pip install 'cultureclip[hf]'") from e
