"""Text-to-image backends for the render stage, through diffusers.

:func:`load_pipeline` loads a real model from the Hugging Face hub or a local folder (default: the
authors' Stable Diffusion 3.5 Large Turbo). :func:`build_tiny_pipeline` builds a *stand-in*: a real
diffusers ``StableDiffusion3Pipeline`` whose transformer, VAE and text encoders are tiny and have
**random weights**, made from config in memory with no download. Its images are noise, not pictures
of the caption; it exists so that tests and the offline demo run the exact code path of a real render
(tokeniser, text encoders, seeded latents, scheduler, VAE decode) in well under a second per image on
CPU. Select it with a model id starting with ``tiny-`` (``tiny-sd3``).

diffusers and transformers are optional (``pip install 'cultureclip[curate]'``); they are imported
on use.
"""
from __future__ import annotations

import gzip
import io
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

DEFAULT_MODEL = "stabilityai/stable-diffusion-3.5-large-turbo"
TINY_PREFIX = "tiny-"
TINY_KINDS = ("sd3",)
DTYPES = ("float16", "bfloat16", "float32")
_EXTRA = "pip install 'cultureclip[curate]'"


def _import_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError as exc:
        raise ImportError(f"rendering images needs diffusers and transformers ({exc}); {_EXTRA}") from exc
    return diffusers, transformers


def resolve_device(device: str = "auto", index: int = 0) -> str:
    """``"auto"``: the GPU ``index % n_gpus`` when CUDA is available (one process per GPU, each given
    its own shard index), else ``"cpu"``. Any other value is returned as it is."""
    import torch
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{index % torch.cuda.device_count()}"
    return "cpu"


def torch_dtype(dtype: str):
    """The torch dtype named ``dtype`` (one of :data:`DTYPES`)."""
    import torch
    if dtype not in DTYPES:
        raise ValueError(f"render dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


def is_tiny(model_id: str) -> bool:
    """Whether ``model_id`` names a random-weight stand-in pipeline rather than a real model."""
    return str(model_id).startswith(TINY_PREFIX)


def load_pipeline(model_id: str = DEFAULT_MODEL, dtype: str = "float16", device: str = "auto", *,
                  seed: int = 0, variant: Optional[str] = None, revision: Optional[str] = None,
                  cpu_offload: bool = False, local_files_only: bool = False, **kwargs: Any):
    """Load a text-to-image pipeline ready to call.

    Args:
        model_id: a hub id or local folder for ``diffusers.AutoPipelineForText2Image.from_pretrained``,
            or ``tiny-sd3`` for the random-weight stand-in of :func:`build_tiny_pipeline`.
        dtype: ``float16`` (the authors' choice), ``bfloat16`` or ``float32``.
        device: ``auto`` (a GPU when there is one, else CPU), ``cpu``, ``cuda``, ``cuda:3``...
        seed: weight seed of the stand-in (ignored by real models).
        variant, revision: passed to ``from_pretrained`` (e.g. ``variant="fp16"``).
        cpu_offload: move submodules to the GPU only while they run (large models on small GPUs).
        local_files_only: never touch the network (the model must be in the local cache).
        **kwargs: more ``from_pretrained`` arguments (e.g. ``text_encoder_3=None, tokenizer_3=None``
            to load SD3 without its T5 encoder).

    Returns:
        The diffusers pipeline, on ``device``, progress bar off.
    """
    torch_dt = torch_dtype(dtype)
    if is_tiny(model_id):
        kind = model_id[len(TINY_PREFIX):]
        pipe = build_tiny_pipeline(seed=seed, kind=kind)
        if dtype != "float32":  # built in float32
            pipe = pipe.to(torch_dtype=torch_dt)
        return pipe.to(resolve_device(device))
    diffusers, _ = _import_diffusers()
    # recent diffusers name the argument ``dtype`` and deprecate ``torch_dtype``; older ones only know the latter
    dtype_arg = "dtype" if hasattr(diffusers.pipelines.pipeline_utils, "_resolve_dtype") else "torch_dtype"
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
        model_id, variant=variant, revision=revision, local_files_only=local_files_only,
        **{dtype_arg: torch_dt}, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    dev = resolve_device(device)
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=dev)
        return pipe
    return pipe.to(dev)


def clip_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokeniser into ``folder``.

    Both are derived from the BPE merge list that open_clip ships (``bpe_simple_vocab_16e6.txt.gz``)
    exactly as open_clip's own tokeniser derives its vocabulary, so the stand-in pipeline tokenises
    text like a real CLIP without downloading a tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]  # open_clip's slice: 48894 merges
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n",
                                       encoding="utf-8")
    return folder


# the stand-in's component sizes (SD3's architecture at toy sizes: tens of milliseconds per 32 px image)
TINY_SD3_SIZES = {
    "clip_l": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32, hidden_act="gelu"),
    "clip_g": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32, hidden_act="gelu"),
    # joint_attention_dim: the two encoders' states are concatenated (2 x 32) then padded to it
    "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64),
    "vae": dict(latent_channels=4, norm_num_groups=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                sample_size=64, shift_factor=0.0609, scaling_factor=1.5035),
}


def build_sd3_pipeline(sizes: Mapping, seed: int = 0, device: str = "cpu", init_std: Optional[float] = None):
    """A ``StableDiffusion3Pipeline`` of the given component sizes with random weights, built offline.

    Two CLIP text encoders with projection, an MMDiT transformer, a KL autoencoder and the flow-matching
    Euler scheduler; the T5 encoder is left out (``text_encoder_3=None``), which SD3 supports (its
    embeddings become zeros). The tokenizer is CLIP's BPE written locally from open_clip's merge list.

    Args:
        sizes: ``{"clip_l", "clip_g", "transformer", "vae"}`` keyword dicts of the four components.
        seed: the weight seed (same seed, same weights, same images); the caller's RNG is not disturbed.
        device: where the modules are built.
        init_std: if set, the transformer's Linear weights are drawn from N(0, init_std) and its biases
            zeroed (at full size PyTorch's default init over 38 adaLN blocks can overflow fp16).

    Returns:
        The pipeline in float32 on ``device``, progress bar off.
    """
    diffusers, transformers = _import_diffusers()
    import torch

    clip = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=49407)
    blocks = len(sizes["vae"]["block_out_channels"])
    # module construction consumes the global RNG: fork it so building never disturbs the caller's
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        text_encoder = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**clip, **sizes["clip_l"]))
        text_encoder_2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**clip, **sizes["clip_g"]))
        transformer = diffusers.SD3Transformer2DModel(**sizes["transformer"])
        if init_std is not None:
            for m in transformer.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=init_std)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks, use_quant_conv=False, use_post_quant_conv=False,
            **sizes["vae"])
    with tempfile.TemporaryDirectory(prefix="sd3-clip-tok-") as tmp:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(clip_tokenizer_files(Path(tmp))),
                                                               local_files_only=True, model_max_length=77)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = 0, kind: str = "sd3"):
    """A **stand-in** Stable Diffusion 3 pipeline with tiny random-weight models, built offline.

    The architecture is SD3's (:func:`build_sd3_pipeline` at :data:`TINY_SD3_SIZES`); only the sizes are
    tiny and the weights random, so the images are structured noise that depends on the prompt and the
    seed, never a picture of the caption. Images must be multiples of 8 pixels (VAE factor 4 x patch
    size 2); 32x32 or 64x64 render in a few tens of milliseconds on one CPU core.

    Args:
        seed: the weight seed (same seed, same weights, same images).
        kind: the architecture; only ``"sd3"``.

    Returns:
        A ``diffusers.StableDiffusion3Pipeline`` on CPU in float32, progress bar off.
    """
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny pipeline {TINY_PREFIX}{kind!r}; known: "
                         f"{[TINY_PREFIX + k for k in TINY_KINDS]}")
    return build_sd3_pipeline(TINY_SD3_SIZES, seed=seed)


class RenderRejected(RuntimeError):
    """A finished render that must not be kept (NaN pixels, flagged by a safety checker)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def render_batch(pipe, prompts: list[str], seeds: list[int], s: Mapping, pad_to: int) -> list:
    """Render ``prompts``; returns one float image array (H, W, 3) in [0, 1] or a RenderRejected each.

    ``s`` holds steps, guidance, width, height, negative_prompt and max_sequence_length (None: the
    pipeline's default). Each image gets its own CPU generator seeded with its seed.

    The batch is padded to ``pad_to`` images (copies of the last prompt) so its shape never varies.
    """
    import numpy as np
    import torch
    n = len(prompts)
    prompts = prompts + [prompts[-1]] * (pad_to - n)
    seeds = seeds + [seeds[-1]] * (pad_to - n)
    kwargs = dict(num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"],
                  width=s["width"], output_type="np")
    if s["negative_prompt"] is not None:
        kwargs["negative_prompt"] = [s["negative_prompt"]] * len(prompts)
    if s["max_sequence_length"] is not None:
        kwargs["max_sequence_length"] = s["max_sequence_length"]
    generators = [torch.Generator("cpu").manual_seed(x) for x in seeds]
    with torch.inference_mode():
        out = pipe(prompt=prompts, generator=generators, **kwargs)
    images = np.asarray(out.images)  # (B, H, W, 3) float in [0, 1]
    flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
    results = []
    for img, flagged in zip(images[:n], flags[:n]):
        if flagged:
            results.append(RenderRejected("nsfw", "the pipeline's safety checker flagged the image"))
        elif not np.isfinite(img).all():
            results.append(RenderRejected("nan_image", f"{int((~np.isfinite(img)).sum())} non-finite pixel values"))
        else:
            results.append(img)
    return results


def png_bytes(img) -> bytes:
    """PNG of a float image in [0, 1] (rounded to uint8 like diffusers' own conversion)."""
    import numpy as np
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray((img * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()
