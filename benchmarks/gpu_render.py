"""The render section of ``gpu_check.py``: a Stable Diffusion 3.5 Large Turbo-sized ``StableDiffusion3Pipeline``
with **random weights** built from config (nothing downloaded), fp16, 4 steps, guidance 0, 512 px, batch 4/8/16,
through our render stage (jobs, records, PNG files) and through bare diffusers on the same prompts and seeds.

The images are noise: the weights are random. Sizes are those of the published model: the MMDiT transformer
at its real depth and width (38 blocks of 38 x 64 heads, about 8B parameters), the two CLIP text encoders at
CLIP-L and OpenCLIP-bigG size, the 16-channel VAE; T5 is off (``text_encoder_3=None``, which SD3 supports: its
77 token embeddings are zeros, where the real model with T5 attends over 256 T5 tokens).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_render import pairs  # beside this script: twin caption sets, 4 images each

# stabilityai/stable-diffusion-3.5-large(-turbo) model_index components, their published configs
SD35_LARGE = {
    "transformer": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu"),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609),
}
# the dry run: the same builder and code path at toy sizes (seconds on a CPU)
TINY = {
    "transformer": dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=64,
                        qk_norm="rms_norm"),
    "clip_l": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32, hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   projection_dim=32, hidden_act="gelu"),
    "vae": dict(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                sample_size=64, scaling_factor=1.5305, shift_factor=0.0609),
}


def build_sd3_pipeline(sizes: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``StableDiffusion3Pipeline`` of the given component sizes with random weights, on ``device`` in
    ``dtype``: the project's builder (the one the render stand-in uses), with the transformer's Linear
    weights drawn from N(0, 0.02) so 38 unnormalised adaLN blocks stay finite in fp16."""
    from cultureclip.curate.backends import t2i
    return t2i.build_sd3_pipeline(sizes, seed=seed, device=device, init_std=0.02).to(device=device, dtype=dtype)


def render_stage(data: list[dict], cfg: dict, out_dir: Path, pipe):
    """Our render stage on ``data`` (twin caption sets) into ``out_dir`` with an already built pipeline.

    The one place this benchmark calls the stage: if the stage's API changes, only this function changes.
    Returns ``(images rendered, render errors)``.
    """
    from cultureclip.curate.stages import render
    from cultureclip.curate.registry import Context
    report = render.run_pairs(data, cfg, Context(out_dir=Path(out_dir)), pipeline=pipe)
    return report.ok, report.errors


def bare_diffusers(pipe, jobs: list[dict], s: dict, batch: int) -> int:
    """The same prompts and seeds straight through the pipeline (numpy output, nothing saved); returns the
    number of non-finite images."""
    import numpy as np
    bad = 0
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        with torch.inference_mode():
            images = pipe(prompt=[j["prompt"] for j in chunk], num_inference_steps=s["steps"],
                          guidance_scale=s["guidance"], height=s["height"], width=s["width"], output_type="np",
                          generator=[torch.Generator("cpu").manual_seed(j["seed"]) for j in chunk]).images
        bad += int((~np.isfinite(np.asarray(images)).reshape(len(chunk), -1).all(axis=1)).sum())
    return bad


def _timed(fn, cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0


def measure_batch(pipe, batch: int, n_images: int, size: int, repeats: int, cuda: bool, dtype: str) -> dict:
    """Bare diffusers and our stage on ``n_images`` images, alternated ``repeats`` times after a warm-up."""
    from cultureclip import schema
    from cultureclip.curate.stages import render
    cfg = {"model": "random-weights-sd35-large-size", "dtype": dtype, "device": "cuda" if cuda else "cpu",
           "width": size, "height": size, "steps": 4, "guidance": 0.0, "batch_size": batch}
    s = render.settings(cfg)
    data = pairs(n_images)
    from cultureclip.curate.runner import seed_from_key
    from cultureclip.curate.runner.jobs import keyed
    jobs = [{"prompt": j[schema.PROMPT], "seed": seed_from_key(j[schema.REC_KEY])}  # keyed as the stage's runner does
            for j in keyed(render.NAME, render.render_jobs(data, s))[0]]
    # warm-up of both paths on one batch: kernels chosen, allocator grown, the stage's imports done
    bare_diffusers(pipe, jobs[:batch], s, batch)
    with tempfile.TemporaryDirectory(prefix="gpu-check-render-") as tmp:
        render_stage(data[:max(1, batch // 4)], cfg, Path(tmp), pipe)
    bare_s, stage_s, nonfinite, rendered, errors, pngs, peak = [], [], 0, [], [], [], {"bare": 0.0, "stage": 0.0}
    for _ in range(repeats):
        _reset_peak(cuda)
        t, bad = _timed(lambda: bare_diffusers(pipe, jobs, s, batch), cuda)
        peak["bare"] = max(peak["bare"], _peak_mib(cuda))
        bare_s.append(t)
        nonfinite += bad
        with tempfile.TemporaryDirectory(prefix="gpu-check-render-") as tmp:
            _reset_peak(cuda)
            t, (ok, err) = _timed(lambda: render_stage(data, cfg, Path(tmp), pipe), cuda)
            peak["stage"] = max(peak["stage"], _peak_mib(cuda))
            stage_s.append(t)
            rendered.append(ok), errors.append(err)
            pngs.append(len(list(Path(tmp).rglob("*.png"))))
    n = len(jobs)
    overheads = [st / b - 1 for b, st in zip(bare_s, stage_s)]  # per round: both saw the same conditions
    return {"batch": batch, "images": n, "size": size, "steps": 4, "guidance": 0.0, "repeats": repeats,
            "bare_images_per_s": n / statistics.median(bare_s), "stage_images_per_s": n / statistics.median(stage_s),
            "bare_seconds": bare_s, "stage_seconds": stage_s, "stage_overhead": statistics.median(overheads),
            "stage_overheads": overheads, "bare_peak_mem_mib": peak["bare"] if cuda else None,
            "stage_peak_mem_mib": peak["stage"] if cuda else None,
            "checks": {"finite": {"ok": nonfinite == 0 and not any(errors),
                                  "detail": f"{nonfinite} non-finite bare images, stage errors per run {errors}"},
                       "stage_wrote_all": {"ok": all(r == n for r in rendered) and all(p == n for p in pngs),
                                           "detail": f"records per run {rendered}, PNG files per run {pngs}, "
                                                     f"of {n} jobs"}}}


def run_render(sec) -> None:
    """Build the pipeline once, then measure each batch size within the section's budget."""
    dry = sec.args.dry_run
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "float16") if cuda else ("cpu", "float32")
    sizes, size, batches = (TINY, 32, (2,)) if dry else (SD35_LARGE, 512, (4, 8, 16))
    # 32 images: several batches even at 16, so PNG writing overlaps rendering as in a long run
    n_images, repeats = (4, 1) if dry else (32, 1)
    holder: dict = {}

    def build() -> dict:
        t0 = time.perf_counter()
        holder["pipe"] = build_sd3_pipeline(sizes, device, getattr(torch, dtype))
        params = {k: sum(p.numel() for p in getattr(holder["pipe"], k).parameters())
                  for k in ("transformer", "text_encoder", "text_encoder_2", "vae")}
        return {"build_s": round(time.perf_counter() - t0, 1), "parameters": params, "dtype": dtype,
                "weights": "random", "t5": "off (text_encoder_3=None)",
                "weights_mib": torch.cuda.memory_allocated() / 2**20 if cuda else None}

    built = sec.attempt("build SD3.5-Large-size pipeline" if not dry else "build tiny SD3 pipeline", build,
                        5 if dry else 40, kind="build")
    for batch in batches:
        name = f"render b{batch}"
        if built["status"] != "ok":
            sec.emit({"name": name, "status": "skipped", "reason": "the pipeline was not built"})
            continue
        need = 3 if dry else 0.25 * n_images * 2 * repeats  # guessed 0.25 s an image: optimistic on purpose
        sec.attempt(name, lambda: measure_batch(holder["pipe"], batch, n_images, size, repeats, cuda, dtype), need,
                    kind="batch")
