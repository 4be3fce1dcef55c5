"""``CultureCLIP``: an open_clip CLIP model with normalised encoders, LoRA and open_clip-format saving.

Loading goes through open_clip's own factory (pretrained tags, ``hf-hub:`` ids, ``local-dir:``), so
everything open_clip can build works here. Two things are stricter than open_clip:

- a pretrained tag trained with QuickGELU on an architecture without it (``ViT-B-32`` + ``openai``)
  is refused; open_clip only warns, and the model then silently computes different features;
- a checkpoint file or saved directory is loaded with ``strict=True`` and *no* positional-embedding
  resizing, so a context length, width or image size that does not match is an error, and
  ``save_pretrained`` stores the architecture in the safetensors header, so a QuickGELU/GELU mismatch
  (invisible in tensor shapes) is an error too.

Files are read with safetensors or ``torch.load(weights_only=True)``; nothing is unpickled
(:mod:`cultureclip.checkpoint_io` holds the file handling).
"""
from __future__ import annotations

import contextlib
import os
from copy import deepcopy
from pathlib import Path
from typing import Optional, Sequence, Union

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from cultureclip import checkpoint_io as io
from cultureclip import lora as lora_lib
from cultureclip.checkpoint_io import (CONFIG_NAME, TRAINING_CKPT_KEY, WEIGHTS_NAME,  # noqa: F401 (public names)
                                       CheckpointMismatchError, UnsafeCheckpointError)
from cultureclip.data.spec import DataSpec
from cultureclip.interop import HF_PREFIX  # light: the hf extra is imported only when used
from cultureclip.text_tokenizer import save_text_files, tokenizer_for
from cultureclip.text_length import encode_prefix, trim_plan, trimmed_length, unique_texts

io.register_shipped_configs()  # e.g. "cultureclip-tiny"


class CultureCLIP(nn.Module):
    """An open_clip CLIP model whose ``encode_*`` return L2-normalised features.

    Build with :meth:`from_pretrained` or :meth:`from_config`. Attributes: ``model`` (the open_clip
    module), ``tokenizer``, ``preprocess_train``, ``preprocess_val``, ``model_cfg`` (the architecture
    dict), ``logit_scale`` (the learnable log-temperature; ``logit_scale.exp()`` is CLIP's ``s``).
    """

    def __init__(self, model: nn.Module, preprocess_train, preprocess_val, tokenizer, model_cfg: dict,
                 name: str = "custom"):
        super().__init__()
        self.model = model
        self.preprocess_train, self.preprocess_val = preprocess_train, preprocess_val
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.name = name
        self.lora_config: Optional[dict] = None
        # exact length trimming of token batches (cultureclip.text_length); off only to time or debug it
        self.trim_text = True
        self.text_length_multiple: Optional[int] = None  # None: 8 on CUDA, 1 elsewhere

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], pretrained: Optional[str] = None,
                        device: Union[str, torch.device] = "cpu", precision: str = "fp32",
                        cache_dir: Optional[str] = None, **kwargs) -> "CultureCLIP":
        """Load a model.

        Args:
            name_or_path: an open_clip architecture (``"ViT-B-32-quickgelu"``), an ``hf-hub:org/repo``
                id, a directory written by :meth:`save_pretrained` (or ``local-dir:DIR``), or
                ``hf-transformers:<model id or dir>`` for a ``transformers`` CLIPModel (converted exactly,
                see :mod:`cultureclip.interop`; ``adapter=<PEFT LoRA dir>`` merges an adapter into it).
            pretrained: with an architecture name: an open_clip pretrained tag (``"openai"``) or a
                checkpoint file (``.safetensors``/``.pt``, read without unpickling); ``None`` builds
                random weights.
            device, precision, cache_dir: as in ``open_clip.create_model_and_transforms``.
            **kwargs: open_clip overrides (``force_quick_gelu``, ``force_context_length``, ...).
        """
        name = str(name_or_path)
        if name.startswith(HF_PREFIX):
            if pretrained is not None:
                raise ValueError(f"{HF_PREFIX} models carry their weights; pretrained must be None")
            from cultureclip.interop.hf_io import from_transformers
            return from_transformers(cls, name[len(HF_PREFIX):], device=device, precision=precision,
                                     cache_dir=cache_dir, **kwargs)
        if name.startswith("local-dir:"):
            name = name[len("local-dir:"):]
        if os.path.isdir(name):
            return cls._from_dir(Path(name), device=device, precision=precision, **kwargs)
        if name.endswith(".ckpt") and os.path.isfile(name):
            return cls._from_training_checkpoint(Path(name), device=device, precision=precision)
        if name.startswith("hf-hub:"):
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, device=device, precision=precision, cache_dir=cache_dir, **kwargs)
            cfg = open_clip.factory._get_hf_config(name[len("hf-hub:"):], cache_dir=cache_dir)["model_cfg"]
            return cls(model, pre_train, pre_val, open_clip.get_tokenizer(name, cache_dir=cache_dir), cfg, name)
        cfg = io.resolve_config(name, pretrained, kwargs)
        is_file = pretrained is not None and os.path.isfile(pretrained)
        with io.quiet_random_init() if is_file else contextlib.nullcontext():
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                name, pretrained=None if is_file else pretrained, device=device, precision=precision,
                cache_dir=cache_dir, **kwargs)
        if is_file:
            io.load_weights_strict(model, Path(pretrained), cfg)
        return cls(model, pre_train, pre_val, tokenizer_for(cfg, cache_dir=cache_dir), cfg, name)

    @classmethod
    def _from_dir(cls, path: Path, **kwargs) -> "CultureCLIP":
        saved, weights = io.read_saved_dir(path)
        with io.quiet_random_init():
            obj = cls.from_config(saved["model_cfg"], name=saved.get("name", path.name),
                                  preprocess_cfg=saved.get("preprocess_cfg"), local_dir=path, **kwargs)
        io.load_weights_strict(obj.model, weights, obj.model_cfg)
        return obj

    @classmethod
    def _from_training_checkpoint(cls, path: Path, **kwargs) -> "CultureCLIP":
        """A Lightning checkpoint written by ``cultureclip.train`` (LoRA merged on load)."""
        meta, state = io.read_training_checkpoint(path)
        with io.quiet_random_init():
            obj = cls.from_config(meta["model_cfg"], name=meta.get("name", "custom"),
                                  preprocess_cfg=meta.get("preprocess_cfg"), **kwargs)
        if meta.get("lora"):
            obj.add_lora(**meta["lora"])
        try:
            obj.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise CheckpointMismatchError(f"{path} does not fit its recorded architecture:\n{e}") from e
        io.log.info("loaded weights from %s", path)
        obj.merge_lora()
        return obj.eval()

    def checkpoint_metadata(self, prefix: str = "encoder.") -> dict:
        """What a training checkpoint records to rebuild this model (see ``_from_training_checkpoint``)."""
        pp = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        preprocess_cfg = {"mean": list(self.model.visual.image_mean), "std": list(self.model.visual.image_std)}
        preprocess_cfg.update({k: pp[k] for k in ("interpolation", "resize_mode") if k in pp})
        return {"name": self.name, "model_cfg": self.model_cfg, "preprocess_cfg": preprocess_cfg,
                "lora": self.lora_config if self.has_lora else None, "prefix": prefix}

    @classmethod
    def from_config(cls, model_cfg: dict, name: str = "custom", preprocess_cfg: Optional[dict] = None,
                    device: Union[str, torch.device] = "cpu", precision: str = "fp32",
                    local_dir: Optional[Union[str, os.PathLike]] = None) -> "CultureCLIP":
        """Build an arbitrary open_clip architecture with random weights (never downloads weights).

        ``model_cfg`` has open_clip's model-config layout (``embed_dim``, ``vision_cfg``, ``text_cfg``,
        ...). The config is registered with open_clip under ``name`` plus a digest of the config (so
        configs never overwrite each other there); the tokenizer comes from the config
        (:func:`cultureclip.text_tokenizer.tokenizer_for`), never from the name.

        ``local_dir``: a saved model directory. A Hugging Face text tower (``text_cfg.hf_model_name``) is
        built from the ``config.json`` there when it has one, else from ``hf_model_name`` itself (a local
        folder, or a Hub id: the Hub is reached only for a Hub id); tokenizer files there win over
        ``hf_tokenizer_name`` the same way.
        """
        cfg = deepcopy(dict(model_cfg))
        text_cfg = cfg.get("text_cfg", {})
        if "hf_model_name" in text_cfg and text_cfg.get("hf_model_pretrained", True):
            text_cfg["hf_model_pretrained"] = False  # from_config promises no download
        build = deepcopy(cfg)
        if "hf_model_name" in text_cfg and local_dir is not None and (Path(local_dir) / "config.json").is_file():
            # open_clip's HFTextEncoder reads AutoConfig.from_pretrained(hf_model_name): point it at the
            # saved config.json for this build only (the recorded architecture stays as saved)
            build["text_cfg"]["hf_model_name"] = str(local_dir)
        key = io.register_config(name, build)
        pp = preprocess_cfg or {}
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            key, pretrained=None, device=device, precision=precision, pretrained_text=False,
            image_mean=pp.get("mean"), image_std=pp.get("std"), image_interpolation=pp.get("interpolation"),
            image_resize_mode=pp.get("resize_mode"))
        return cls(model, pre_train, pre_val, tokenizer_for(cfg, local_dir=local_dir), cfg, name)

    # ------------------------------------------------------------------ encoders
    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> Optional[nn.Parameter]:
        """The learned bias of a sigmoid-trained model (SigLIP's ``logit_bias``), or None."""
        return getattr(self.model, "logit_bias", None)

    @torch.no_grad()
    def calibration(self, device: Union[str, torch.device]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(s, b)``: the scale ``exp(logit_scale)`` and the ``logit_bias`` (None without one) as float
        tensors on ``device``. Take it once per evaluation: each call copies from the model's device."""
        bias = self.logit_bias
        return (self.logit_scale.detach().exp().float().to(device),
                None if bias is None else bias.detach().float().to(device))

    @torch.no_grad()
    def match_probabilities(self, cos: torch.Tensor, dim: int = -1,
                            calibration: Optional[tuple] = None) -> torch.Tensor:
        """Probabilities from cosine similarities ``cos`` in the model's own calibration.

        Softmax over ``dim`` of ``s * cos`` for a softmax-trained model; for a model with a
        ``logit_bias`` the independent per-pair ``sigmoid(s * cos + b)`` it was trained with (these
        need not sum to 1). Either way the ranking is the ranking of ``cos``. ``calibration`` is
        :meth:`calibration` taken once by a caller that scores many small sets (no copy per call).
        """
        scale, bias = calibration if calibration is not None else self.calibration(cos.device)
        if bias is None:
            return (scale * cos.float()).softmax(dim=dim)
        return torch.sigmoid(scale * cos.float() + bias)

    @property
    def context_length(self) -> int:
        return int(self.model_cfg.get("text_cfg", {}).get("context_length", 77))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def tokenize(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """Token ids ``[N, L]``; ``context_length`` shorter than the model's is allowed for causal towers."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer(texts, context_length=context_length or self.context_length)

    def data_spec(self) -> DataSpec:
        """What the twin-pair data pipeline needs from this model (transforms, tokenizer)."""
        return DataSpec(self.preprocess_train, self.preprocess_val, self.tokenizer, self.supports_short_context)

    @property
    def supports_short_context(self) -> bool:
        """Whether text may be encoded with fewer tokens than ``context_length`` without changing features.

        True for a causal text transformer with end-of-text pooling (see :mod:`cultureclip.text_length`);
        :meth:`encode_text` then trims every token batch to its longest text by itself.
        """
        return trim_plan(self.model) is not None

    def _length_multiple(self, device: torch.device) -> int:
        """The multiple trimmed lengths round up to: ``text_length_multiple``, or 8 on CUDA and 1 elsewhere."""
        if self.text_length_multiple is not None:
            return self.text_length_multiple
        return 8 if device.type == "cuda" else 1  # tensor-core tiles; on a CPU every token costs

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        if L > self.context_length:
            raise ValueError(f"token ids of length {L} exceed the model's context length {self.context_length}")
        plan = trim_plan(self.model)
        if plan is None:
            if L < self.context_length:
                raise ValueError(f"this text tower needs the full context length {self.context_length}, got {L}")
            return self.model.encode_text(tokens)
        if self.trim_text:
            tokens = tokens[:, :trimmed_length(tokens, *plan, multiple=self._length_multiple(tokens.device))]
        if tokens.shape[1] == self.context_length:
            return self.model.encode_text(tokens)
        return encode_prefix(self.model, tokens)

    def encode_text(self, texts: Union[str, Sequence[str], torch.Tensor], dedup: bool = False) -> torch.Tensor:
        """L2-normalised text features ``[N, D]`` from strings or token ids ``[N, L]``.

        ``dedup``: encode each distinct text once and gather the features back (same features; the
        gather's backward sums the duplicates' gradients, as encoding each copy would).
        """
        if dedup:
            unique, inverse = unique_texts(texts)
            if len(unique) < len(inverse):
                return self.encode_text(unique)[inverse.to(self.device)]  # [N, D]
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        return F.normalize(self._encode_tokens(tokens.to(self.device)), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features ``[N, D]`` from preprocessed pixels ``[N, 3, H, W]``."""
        return self.model.encode_image(pixels.to(self.device), normalize=True)

    def forward(self, pixels: torch.Tensor, texts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image_features, text_features, s)`` with ``s = logit_scale.exp()``."""
        return self.encode_image(pixels), self.encode_text(texts), self.logit_scale.exp()

    # ------------------------------------------------------------------ fine-tuning set-ups
    def towers(self) -> dict[str, nn.Module]:
        m = self.model
        text = m.text if hasattr(m, "text") else m.transformer
        return {"image": m.visual, "text": text}

    def add_lora(self, r: int = 4, alpha: float = 16, dropout: float = 0.1, targets: str = "qv",
                 towers: Sequence[str] = ("image", "text"), layers: Union[str, Sequence[int]] = "all",
                 mlp: bool = False) -> int:
        """Put LoRA adapters on the attention of the chosen towers and freeze everything else.

        Returns the number of trainable parameters (the adapters). See :func:`cultureclip.lora.add_lora`.
        """
        available = self.towers()
        unknown = set(towers) - set(available)
        if unknown or not towers:
            raise ValueError(f"towers must be a non-empty subset of {sorted(available)}, got {list(towers)}")
        if self.has_lora:
            raise ValueError("LoRA adapters are already in place; merge_lora() first to stack another set")
        self.requires_grad_(False)
        self.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets,
                            "towers": list(towers), "layers": layers if isinstance(layers, str) else list(layers),
                            "mlp": bool(mlp)}
        wrapped = lora_lib.add_lora({t: available[t] for t in towers}, r=r, alpha=alpha, dropout=dropout,
                                    targets=targets, layers=layers, mlp=mlp)
        for w in wrapped:
            w.lora.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_by_tower(self) -> dict[str, int]:
        """Trainable parameter counts per tower (``image``, ``text``) and ``other`` (temperature, bias,
        anything outside the towers, e.g. CoCa's text decoder)."""
        counts = {name: 0 for name in (*self.towers(), "other")}
        owner = {id(p): name for name, tower in self.towers().items() for p in tower.parameters()}
        for p in self.parameters():
            if p.requires_grad:
                counts[owner.get(id(p), "other")] += p.numel()
        return counts

    def merge_lora(self) -> int:
        """Fold adapters into the base weights (outputs unchanged); returns how many modules were merged."""
        n = lora_lib.merge_lora(self.model)
        self.lora_config = None
        return n

    @property
    def has_lora(self) -> bool:
        return any(True for _ in lora_lib.lora_modules(self.model))

    def lock(self, image: bool = False, text: bool = False, unlocked_groups: int = 0) -> None:
        """Freeze a tower for full fine-tuning of the other (open_clip's ``lock_*_tower``)."""
        if image:
            self.model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
        if text:
            self.model.lock_text_tower(unlocked_layers=unlocked_groups, freeze_layer_norm=True)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: Union[str, os.PathLike], format: str = "open_clip") -> Path:
        """Write open_clip's hub layout (``open_clip_config.json`` + ``open_clip_model.safetensors``).

        ``format="transformers"`` writes a ``transformers`` CLIPModel directory instead (config, weights,
        tokenizer and image processor; see :func:`cultureclip.interop.hf_io.save_transformers`).

        Adapters are merged into a copy first, so the files load into plain open_clip
        (``create_model_and_transforms("local-dir:" + directory)``) and this model keeps training.
        Files are written to temporary names and renamed, so an interrupted save never leaves a
        half-written model that looks complete.
        """
        if format not in ("open_clip", "transformers"):
            raise ValueError(f"format must be 'open_clip' or 'transformers', got {format!r}")
        model = self.model
        if self.has_lora:
            model = deepcopy(self.model)
            lora_lib.merge_lora(model)
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        if format == "transformers":
            from cultureclip.interop.hf_io import save_transformers
            return save_transformers(self, state, directory)
        directory = Path(directory)
        model_cfg = save_text_files(self.model_cfg, self.tokenizer, getattr(self.model, "text", None), directory)
        config = {"model_cfg": model_cfg, "preprocess_cfg": self.checkpoint_metadata()["preprocess_cfg"],
                  "name": self.name}
        return io.write_saved_dir(directory, state, model_cfg, config)



def build_encoder(name: str, pretrained: Optional[str] = None, lora: Optional[dict] = None,
                  lock_image: bool = False, lock_text: bool = False, unlocked_groups: int = 0,
                  text_length_multiple: Optional[int] = None, **kwargs) -> CultureCLIP:
    """Load a model and set it up for fine-tuning, from plain values (what a config file holds).

    Args:
        name, pretrained, **kwargs: as in :meth:`CultureCLIP.from_pretrained`.
        lora: keyword arguments of :meth:`CultureCLIP.add_lora` (``r``, ``alpha``, ``dropout``,
            ``targets``, ``towers``, ``layers``), or None for full fine-tuning.
        lock_image, lock_text, unlocked_groups: freeze a tower (full fine-tuning only).
        text_length_multiple: trimmed token batches round up to this length multiple (None: 8 on CUDA,
            1 elsewhere; see :mod:`cultureclip.text_length`).
    """
    if lora is not None and (lock_image or lock_text):
        raise ValueError("lora already freezes all base weights; lock_image/lock_text are for full fine-tuning")
    model = CultureCLIP.from_pretrained(name, pretrained=pretrained, **kwargs)
    if text_length_multiple is not None and text_length_multiple < 1:
        raise ValueError(f"model.text_length_multiple must be >= 1 or null, got {text_length_multiple}")
    model.text_length_multiple = text_length_multiple
    if lora is not None:
        lora = dict(lora)
        if "towers" in lora:
            lora["towers"] = tuple(lora["towers"])
        if not isinstance(lora.get("layers", "all"), str):
            lora["layers"] = list(lora["layers"])
        model.add_lora(**lora)
    model.lock(image=lock_image, text=lock_text, unlocked_groups=unlocked_groups)
    return model
