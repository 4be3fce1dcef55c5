"""Loading ``transformers`` CLIP models as :class:`~cultureclip.model.CultureCLIP` and exporting back.

``CultureCLIP.from_pretrained("hf-transformers:<id or dir>")`` and
``save_pretrained(dir, format="transformers")`` dispatch here. The weight rules live in
:mod:`cultureclip.interop.hf_convert`; this module adds the file handling, the tokenizer (the CLIP BPE
vocabulary shipped with open_clip, turned into ``vocab.json``/``merges.txt``) and preprocessing.

Preprocessing: ``transformers``' ``CLIPImageProcessor`` resizes the shortest edge, centre-crops, then
normalises; open_clip's ``resize_mode="shortest"`` does the same at ``image_size``, and ``"squash"``
is a resize to ``height x width`` without crop. Mean, std and the resampling filter carry over. A
processor setting open_clip cannot express (resize to 256 then crop 224) is logged as a warning on
import, since the weights still convert exactly; on export it is an error, because the exported
pipeline would silently see other pixels.
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import torch

from cultureclip.interop import hf_convert as conv
from cultureclip.interop import require

log = logging.getLogger("cultureclip")
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # transformers' names of open_clip's <start_of_text>/<end_of_text>
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL filter codes in preprocessor_config.json
_RESAMPLE_CODE = {v: k for k, v in _RESAMPLE.items()}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` of the CLIP BPE tokenizer, built from open_clip's bundled merges file the way
    open_clip's ``SimpleTokenizer`` builds it, with the special tokens under ``transformers``' names.

    Cached: callers must not modify the returned objects."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in lines] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, lines


def _optional_file(name: str, filename: str, cache_dir: Optional[str]) -> Optional[str]:
    """Path of ``filename`` in a model directory or repository, or None if it has none."""
    if os.path.isdir(name):
        path = Path(name) / filename
        return str(path) if path.is_file() else None
    from transformers.utils import cached_file
    return cached_file(name, filename, cache_dir=cache_dir, _raise_exceptions_for_missing_entries=False)


def check_tokenizer(name: str, vocab_size: int, cache_dir: Optional[str] = None) -> None:
    """Refuse a model whose tokenizer is not the CLIP BPE tokenizer open_clip uses.

    Compares ``vocab.json`` (or the vocabulary inside ``tokenizer.json``) with :func:`clip_bpe_vocab`.
    """
    expected, _ = clip_bpe_vocab()
    if vocab_size != len(expected):
        raise conv.ConversionError(f"{name}: text_config.vocab_size is {vocab_size}, the CLIP BPE tokenizer "
                                   f"has {len(expected)} tokens; other tokenizers are not supported")
    vocab_file = _optional_file(name, "vocab.json", cache_dir)
    if vocab_file is not None:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
    else:
        tok_file = _optional_file(name, "tokenizer.json", cache_dir)
        if tok_file is None:
            log.warning("%s has no vocab.json or tokenizer.json; assuming the CLIP BPE tokenizer", name)
            return
        vocab = json.loads(Path(tok_file).read_text(encoding="utf-8")).get("model", {}).get("vocab", {})
    if vocab != expected:
        differ = [t for t in expected if vocab.get(t) != expected[t]][:5]
        raise conv.ConversionError(f"{name}: the tokenizer vocabulary differs from the CLIP BPE vocabulary "
                                   f"(e.g. tokens {differ}); open_clip would encode text differently")


# ---------------------------------------------------------------------------------------- preprocessing
def _size(value: Any, int_key: str) -> dict:
    """A size entry as a dict; older files store a bare int (the shortest edge for ``size``, the square
    side for ``crop_size``)."""
    if isinstance(value, int):
        return {"shortest_edge": value} if int_key == "shortest_edge" else {"height": value, "width": value}
    return dict(value or {})


def preprocess_cfg_from_hf(pp: Optional[dict], image_size: int, source: str) -> dict:
    """open_clip ``preprocess_cfg`` (mean, std, interpolation, resize_mode) from a preprocessor config."""
    if pp is None:
        log.warning("%s has no preprocessor_config.json; using OpenAI CLIP's mean/std, bicubic, "
                    "shortest-edge resize and centre crop at %d", source, image_size)
        return {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                "resize_mode": "shortest"}
    out = {"mean": list(pp.get("image_mean", OPENAI_MEAN)), "std": list(pp.get("image_std", OPENAI_STD))}
    resample = pp.get("resample", 3)
    if resample not in _RESAMPLE:
        log.warning("%s: resample=%s has no open_clip equivalent; using bicubic", source, resample)
    out["interpolation"] = _RESAMPLE.get(resample, "bicubic")
    size, crop = _size(pp.get("size"), "shortest_edge"), _size(pp.get("crop_size"), "square")
    if pp.get("do_center_crop", True):
        out["resize_mode"] = "shortest"
        shortest = size.get("shortest_edge", image_size)
        if shortest != image_size or crop.get("height", image_size) != image_size:
            log.warning("%s resizes to %s and crops %s; open_clip resizes to %d and crops %d",
                        source, shortest, crop, image_size, image_size)
    else:
        out["resize_mode"] = "squash"
        if size.get("height", image_size) != image_size or size.get("width", image_size) != image_size:
            log.warning("%s resizes to %s; open_clip resizes to %d", source, size, image_size)
    if not pp.get("do_normalize", True) or abs(pp.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        log.warning("%s does not rescale by 1/255 and normalise; open_clip always does", source)
    return out


def hf_preprocessor_from_open_clip(pp: dict, image_size: int) -> dict:
    """``CLIPImageProcessor`` keyword arguments for open_clip's preprocess settings."""
    mode, interp = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
    if interp not in _RESAMPLE_CODE:
        raise conv.ConversionError(f"preprocess interpolation {interp!r} has no transformers equivalent")
    kw = {"do_resize": True, "resample": _RESAMPLE_CODE[interp], "do_rescale": True, "rescale_factor": 1 / 255,
          "do_normalize": True, "image_mean": list(pp["mean"]), "image_std": list(pp["std"]), "do_convert_rgb": True}
    if mode == "shortest":
        kw.update(size={"shortest_edge": image_size}, do_center_crop=True,
                  crop_size={"height": image_size, "width": image_size})
    elif mode == "squash":
        kw.update(size={"height": image_size, "width": image_size}, do_center_crop=False)
    else:
        raise conv.ConversionError(f"preprocess resize_mode {mode!r} (padding) has no CLIPImageProcessor equivalent")
    return kw


# ---------------------------------------------------------------------------------------- import
def read_preprocessor_config(name: str, cache_dir: Optional[str] = None) -> Optional[dict]:
    """The image processor settings: ``preprocessor_config.json``, or the ``image_processor`` entry of
    ``processor_config.json`` (where ``transformers`` 5 keeps them); None if neither exists."""
    pp_file = _optional_file(name, "preprocessor_config.json", cache_dir)
    if pp_file is not None:
        return json.loads(Path(pp_file).read_text())
    proc_file = _optional_file(name, "processor_config.json", cache_dir)
    if proc_file is not None:
        return json.loads(Path(proc_file).read_text()).get("image_processor")
    return None


def load_hf_state(name: str, cache_dir: Optional[str] = None) -> tuple[dict, dict]:
    """``(CLIPConfig dict, float32 state dict)`` of a ``transformers`` CLIPModel directory or model id.

    Goes through ``CLIPModel.from_pretrained`` (safetensors, or ``torch.load`` with ``weights_only``)
    and refuses checkpoints with missing, unexpected or mis-shaped tensors, which ``transformers``
    would otherwise fill with random values and only warn about.
    """
    transformers = require("transformers")
    config = transformers.AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    if config.model_type != "clip":
        raise conv.ConversionError(f"{name} is a {config.model_type!r} model; only 'clip' (CLIPModel) converts")
    model, info = transformers.CLIPModel.from_pretrained(name, config=config, cache_dir=cache_dir,
                                                         output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"error_msgs": info["error_msgs"]} if info.get("error_msgs") else {})
    if bad:
        raise conv.ConversionError(f"{name}: the checkpoint does not fit its config.json: {bad}")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return config.to_dict(), state


def display_name(name: str) -> str:
    """A registry-safe model name: the directory's or repository's last component."""
    return Path(str(name).rstrip("/")).name.replace(":", "-") or "hf-clip"


def from_transformers(cls, name: str, adapter: Optional[Union[str, os.PathLike]] = None,
                      allow_other_base: bool = False, device: Union[str, torch.device] = "cpu", precision: str = "fp32",
                      cache_dir: Optional[str] = None, **kwargs):
    """Build ``cls`` (a :class:`CultureCLIP`) from a ``transformers`` CLIPModel, optionally merging a PEFT
    LoRA adapter first (:func:`cultureclip.interop.peft_merge.merge_adapter`; ``allow_other_base`` as there)."""
    if kwargs:
        raise TypeError(f"hf-transformers: models take no open_clip overrides, got {sorted(kwargs)}")
    from cultureclip import checkpoint_io as io
    hf_cfg, state = load_hf_state(name, cache_dir=cache_dir)
    cfg = conv.open_clip_cfg_from_hf(hf_cfg)
    check_tokenizer(name, hf_cfg["text_config"]["vocab_size"], cache_dir)
    if adapter is not None:
        from cultureclip.interop.peft_merge import merge_adapter
        state = merge_adapter(state, adapter, base_name=name, allow_other_base=allow_other_base)
    pp = read_preprocessor_config(name, cache_dir)
    preprocess_cfg = preprocess_cfg_from_hf(pp, cfg["vision_cfg"]["image_size"], name)
    oc_state = conv.open_clip_state_from_hf(state, cfg["vision_cfg"]["layers"], cfg["text_cfg"]["layers"])
    with io.quiet_random_init():
        obj = cls.from_config(cfg, name=display_name(name), preprocess_cfg=preprocess_cfg, device=device,
                              precision=precision)
    obj.model.load_state_dict(oc_state, strict=True)  # copy_ casts to the built dtypes (open_clip's precision rules)
    return obj.eval()


# ---------------------------------------------------------------------------------------- export
def _hf_features(hf_model, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised features from ``get_image_features``/``get_text_features``, whether they return a
    tensor (older ``transformers``) or an output object with the projected ``pooler_output``."""
    img = hf_model.get_image_features(pixel_values=pixels)
    txt = hf_model.get_text_features(input_ids=tokens)
    unwrap = lambda out: out if isinstance(out, torch.Tensor) else out.pooler_output  # noqa: E731
    return unwrap(img), unwrap(txt)


@torch.no_grad()
def verify_export(model, hf_model, atol: float = 1e-4, seed: int = 0) -> Optional[float]:
    """Largest absolute difference between the two models' normalised features on random pixels and
    tokenized text; raises :class:`~cultureclip.interop.hf_convert.ConversionError` above ``atol``.

    Skipped (returns None) for a model that is not float32: its rounding alone would exceed ``atol``.
    """
    if any(p.dtype != torch.float32 for p in model.parameters()):
        log.warning("export of a non-float32 model: feature check skipped")
        return None
    g = torch.Generator().manual_seed(seed)
    size = model.model_cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    pixels = torch.randn(2, 3, size, size, generator=g)
    tokens = model.tokenize(["a photo of a red lantern", "two dumplings on a plate"])
    was_training = model.training
    model.eval()  # dropout (LoRA, patch dropout) off, as in the exported model
    try:
        ours_i = model.model.encode_image(pixels.to(model.device), normalize=True).cpu()
        ours_t = model.model.encode_text(tokens.to(model.device), normalize=True).cpu()
    finally:
        model.train(was_training)
    hf_i, hf_t = _hf_features(hf_model, pixels, tokens)
    F = torch.nn.functional
    diff = max(float((ours_i - F.normalize(hf_i, dim=-1)).abs().max()),
               float((ours_t - F.normalize(hf_t, dim=-1)).abs().max()))
    if diff > atol:
        raise conv.ConversionError(f"exported model's features differ from the original by {diff:.3g} > {atol}")
    return diff


def save_transformers(model, state: dict, directory: Union[str, os.PathLike], verify: bool = True) -> Path:
    """Write ``model`` (a :class:`CultureCLIP`; ``state`` its open_clip state dict with adapters merged) as a
    ``transformers`` CLIPModel directory: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``
    and the CLIP tokenizer files, loadable by ``CLIPModel.from_pretrained`` and the
    ``zero-shot-image-classification`` pipeline.

    Files are written to a temporary sibling directory and moved in afterwards (``config.json`` last), so
    an interrupted export never leaves a directory that looks complete.
    """
    transformers = require("transformers")
    kw = conv.hf_config_from_open_clip(model.model_cfg)
    from open_clip.tokenizer import SimpleTokenizer
    if kw["text_config"]["vocab_size"] != len(clip_bpe_vocab()[0]) or not isinstance(model.tokenizer, SimpleTokenizer):
        raise conv.ConversionError("only models using open_clip's CLIP BPE tokenizer (49408 tokens) export")
    hf_state = conv.hf_state_from_open_clip({k: v.detach().float().cpu() for k, v in state.items()},
                                            kw["vision_config"]["num_hidden_layers"],
                                            kw["text_config"]["num_hidden_layers"])
    config = transformers.CLIPConfig(text_config=kw["text_config"], vision_config=kw["vision_config"],
                                     projection_dim=kw["projection_dim"],
                                     logit_scale_init_value=float(hf_state["logit_scale"]))
    config.architectures = ["CLIPModel"]
    hf_model = transformers.CLIPModel(config).eval()
    hf_model.load_state_dict(hf_state, strict=True)
    pp = model.checkpoint_metadata()["preprocess_cfg"]
    image_size = kw["vision_config"]["image_size"]
    processor = transformers.CLIPProcessor(
        image_processor=transformers.CLIPImageProcessor(**hf_preprocessor_from_open_clip(pp, image_size)),
        tokenizer=_hf_tokenizer(transformers, model.context_length))
    if verify:
        verify_export(model, hf_model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=directory))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # the per-component files too, for readers that look for them (older transformers, other tools)
        processor.image_processor.save_pretrained(tmp)
        if not (tmp / "vocab.json").exists():
            write_vocab_files(tmp)
        files = sorted(tmp.iterdir(), key=lambda p: p.name == "config.json")  # config.json last
        for f in files:
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def write_vocab_files(directory: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer (the layout of OpenAI's CLIP repositories)."""
    vocab, merges = clip_bpe_vocab()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _base_hf_tokenizer():
    """A ``CLIPTokenizer`` read from the vocabulary files (the one constructor every version accepts).
    Built once per process: turning 49k merges into a tokenizer takes seconds."""
    transformers = require("transformers")
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(Path(tmp))
        return transformers.CLIPTokenizer.from_pretrained(tmp)


def _hf_tokenizer(transformers, context_length: int):
    tok = _base_hf_tokenizer()
    tok.model_max_length = context_length  # set on every use: the cached object is shared
    return tok
