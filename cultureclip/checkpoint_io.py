"""Reading and writing model files for :class:`cultureclip.model.CultureCLIP`, strictly and safely.

- Files are read with safetensors or ``torch.load(weights_only=True)``; a file that needs unpickling of
  arbitrary objects is refused with :class:`UnsafeCheckpointError` naming it, and never unpickled.
- Weights are loaded with ``strict=True`` and no positional-embedding resizing; ``save_pretrained``
  records the architecture in the safetensors header, so a QuickGELU/GELU mismatch (invisible in the
  tensor shapes) is caught too (:class:`CheckpointMismatchError`).
- In-memory architectures are registered with open_clip under a name that includes a digest of the
  config, so two different configs never overwrite each other in open_clip's registry.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
from copy import deepcopy
from pathlib import Path
from typing import Any, Iterator, Optional

import open_clip
import torch
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

CONFIG_NAME = "open_clip_config.json"  # open_clip's hub layout (push_to_hf_hub.py)
WEIGHTS_NAME = "open_clip_model.safetensors"
CFG_META_KEY = "open_clip_model_cfg"  # safetensors header entry that records the architecture
TRAINING_CKPT_KEY = "cultureclip"  # entry of a Lightning checkpoint that describes the encoder
MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"  # open_clip's warning, see quiet_random_init

log = logging.getLogger("cultureclip")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the requested architecture."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be read without unpickling arbitrary Python objects."""


def resolve_config(name: str, pretrained: Optional[str], overrides: dict) -> dict:
    """The architecture dict open_clip will build for a built-in name, with the same overrides.

    Raises:
        CheckpointMismatchError: a pretrained tag trained with QuickGELU on an architecture without it
            (``ViT-B-32`` + ``openai``); open_clip only warns and then computes different features.
    """
    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {name!r}; see open_clip.list_models()")
    if overrides.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    if overrides.get("force_context_length") is not None:
        cfg["text_cfg"]["context_length"] = overrides["force_context_length"]
    if overrides.get("force_image_size") is not None:
        cfg["vision_cfg"]["image_size"] = overrides["force_image_size"]
    if overrides.get("force_patch_dropout") is not None:
        cfg["vision_cfg"]["patch_dropout"] = overrides["force_patch_dropout"]
    if pretrained and not os.path.isfile(pretrained):
        tag_cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained) or {}
        if bool(tag_cfg.get("quick_gelu", False)) != bool(cfg.get("quick_gelu", False)):
            raise CheckpointMismatchError(
                f"pretrained tag {pretrained!r} was trained with quick_gelu={tag_cfg.get('quick_gelu', False)} "
                f"but architecture {name!r} has quick_gelu={cfg.get('quick_gelu', False)}; use "
                f"'{name}-quickgelu' (or force_quick_gelu=True) so the features are the ones the weights expect")
    return cfg


def _register(key: str, cfg: dict) -> None:
    existing = open_clip.factory._MODEL_CONFIGS.get(key)
    if existing is not None and existing != cfg:
        raise ValueError(f"open_clip already has a different model config named {key!r}; refusing to replace it")
    # open_clip's registry is the only way to hand create_model an in-memory config
    open_clip.factory._MODEL_CONFIGS[key] = deepcopy(cfg)


def register_config(name: str, cfg: dict) -> str:
    """Register an architecture with open_clip; returns its registry key (name + config digest)."""
    digest = hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    key = f"cultureclip-cfg-{name}-{digest}"
    _register(key, cfg)
    return key


def register_shipped_configs() -> None:
    """Register ``model_configs/*.json`` (e.g. ``cultureclip-tiny``), refusing to shadow a different one."""
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        _register(path.stem, json.loads(path.read_text()))


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_RANDOM_INIT_NOTICE)


@contextlib.contextmanager
def quiet_random_init() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning, and only it.

    For builds whose weights are loaded from a file right after: the warning would be false there.
    """
    root, drop = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(drop)  # open_clip logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextlib.contextmanager
def refuse_unsafe(path: Path) -> Iterator[None]:
    """Turn torch's ``weights_only`` refusal (advice: rerun with ``weights_only=False``) into an
    :class:`UnsafeCheckpointError` that names the file and says why it was refused."""
    try:
        yield
    except pickle.UnpicklingError:
        raise UnsafeCheckpointError(
            f"{path} was refused: it is not a safe checkpoint. It holds pickled Python objects beyond tensors "
            f"and plain containers, and unpickling them could run arbitrary code, so it is never loaded. "
            f"Use a safetensors file or a state dict of tensors (torch.save(model.state_dict(), ...)).") from None


def torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU; an unsafe pickle is an :class:`UnsafeCheckpointError`."""
    with refuse_unsafe(path):
        return torch.load(str(path), map_location="cpu", weights_only=True)


def saved_config(weights: Path) -> Optional[dict]:
    """The architecture recorded in a safetensors header by ``save_pretrained`` (None if absent)."""
    if weights.suffix != ".safetensors":
        return None
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[CFG_META_KEY]) if CFG_META_KEY in meta else None


def _diff_keys(a: Any, b: Any, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for k in set(a) | set(b):
            out |= _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def load_weights_strict(model: nn.Module, path: Path, cfg: Optional[dict]) -> None:
    """Load a weights file into ``model`` with ``strict=True``, checking a recorded architecture first."""
    saved = saved_config(path)
    if saved is not None and cfg is not None and saved != cfg:
        diff = sorted(_diff_keys(saved, cfg))
        raise CheckpointMismatchError(f"{path} was saved from a different architecture; differing fields: {diff}")
    with refuse_unsafe(path):
        state = _open_clip_load_state_dict(str(path), weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape or key mismatch: re-raise naming the file, keep torch's detail
        raise CheckpointMismatchError(f"{path} does not fit this architecture:\n{e}") from e
    log.info("loaded weights from %s", path)


def read_saved_dir(path: Path) -> tuple[dict, Path]:
    """``(open_clip_config.json contents, weights path)`` of a ``save_pretrained`` directory."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a directory written by save_pretrained "
                                f"or open_clip's hub layout")
    saved = json.loads(config_file.read_text())
    if "model_cfg" not in saved:
        raise ValueError(f"{config_file} has no 'model_cfg' entry")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (save_pretrained writes safetensors weights)")
    return saved, weights


def read_training_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(encoder metadata, encoder state dict without prefix)`` of a ``cultureclip.train`` checkpoint."""
    ckpt = torch_load(path)
    meta = ckpt.get(TRAINING_CKPT_KEY) if isinstance(ckpt, dict) else None
    if meta is None:
        raise ValueError(f"{path} was not written by cultureclip.train (no {TRAINING_CKPT_KEY!r} entry); "
                         f"load its state dict with an architecture name and pretrained=<file>")
    prefix = meta.get("prefix", "encoder.")
    return meta, {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def write_saved_dir(directory: Path, state: dict, model_cfg: dict, config: dict) -> Path:
    """Write open_clip's hub layout atomically: temporary names, then renames (weights before config)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp_w, tmp_c = directory / (WEIGHTS_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w), metadata={CFG_META_KEY: json.dumps(model_cfg, sort_keys=True), "format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2))
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)
    return directory
