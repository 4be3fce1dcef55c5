"""Markdown of ``gpu_check.json`` (``gpu_check.md``): environment, one table per section, self-checks, targets."""
from __future__ import annotations

import os
import platform
import subprocess


def _f(x, fmt: str = ".3g", none: str = "-") -> str:
    return none if x is None else format(x, fmt)


def _checks(r: dict) -> str:
    """``finite ok, loss_falls FAILED (...)`` over a result's checks."""
    checks = r.get("checks") or {}
    return ", ".join(f"{k} ok" if c["ok"] else f"{k} FAILED ({c['detail']})" for k, c in checks.items()) or "-"


def _not_ok(r: dict) -> str:
    return f"{r['status']}: {r.get('error') or r.get('reason', '')}".replace("\n", " ").replace("|", "/")[:300]


def train_table(rows: list[dict]) -> list[str]:
    lines = ["| setting | side | images/s | ms/step | data wait | TFLOP/s | MFU | MFU logged | peak MiB | "
             "trainable | self-checks |", "|---" * 11 + "|"]
    for r in rows:
        if r.get("kind") == "comparison":
            limit = "" if r.get("flop_limit") is None else (
                f"; FLOP-ratio limit {r['flop_limit']:.2f}, {r['fraction_of_limit']:.0%} of it reached")
            lines.append(f"| {r['config']} | **ours / open_clip** | **x{r['ratio_images_per_s']:.2f}**{limit} |"
                         + " |" * 8)
        elif r["status"] != "ok":
            lines.append(f"| {r.get('config', r['name'])} | {r.get('side', '')} | {_not_ok(r)} |" + " |" * 8)
        else:
            lines.append(f"| {r['config']} | {r['side']} ({r.get('optimizer')} AdamW) | {r['images_per_s']:.0f} | "
                         f"{r['ms_per_step']:.1f} | {100 * r['wait_frac']:.0f}% | {_f(r.get('tflops'), '.1f')} | "
                         f"{_f(r.get('mfu'), '.1%')} | {_f(r.get('train_mfu_logged'), '.1%')} | "
                         f"{r['peak_mem_mib']:.0f} | {r.get('trainable_params', 0) / 1e6:.2f}M | {_checks(r)} |")
    return lines


def render_table(rows: list[dict]) -> list[str]:
    head, table = [], ["| row | images | bare diffusers images/s | our stage images/s | stage overhead | "
                       "peak MiB bare / stage | self-checks |", "|---" * 7 + "|"]
    for r in rows:
        if r.get("kind") == "build" and r["status"] == "ok":
            params = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in r["parameters"].items())
            head += [f"Pipeline: {params} parameters, {r['dtype']}, weights **random**, T5 {r['t5']}; built in "
                     f"{r['build_s']} s" + (f", {r['weights_mib']:.0f} MiB on the GPU" if r.get("weights_mib") else ""),
                     ""]
        elif r["status"] != "ok":
            table.append(f"| {r['name']} | {_not_ok(r)} |" + " |" * 5)
        else:
            table.append(f"| {r['name']} ({r['size']} px, {r['steps']} steps) | {r['images']} | "
                         f"{r['bare_images_per_s']:.2f} | {r['stage_images_per_s']:.2f} | {r['stage_overhead']:+.1%} | "
                         f"{_f(r['bare_peak_mem_mib'], '.0f')} / {_f(r['stage_peak_mem_mib'], '.0f')} | {_checks(r)} |")
    return head + table


def eval_table(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"- {r['name']}: {_not_ok(r)}")
        elif r.get("kind") == "embed":
            lines += [f"- {r['name']} ({r['model']}, random weights, {r['images']} images, {r['texts']} texts, "
                      f"batch {r['batch_size']}): images/s ours {r['ours_images_per_s']:.0f} vs "
                      f"{r['theirs_images_per_s']:.0f} (x{r['images_ratio']:.2f}), texts/s ours "
                      f"{r['ours_texts_per_s']:.0f} vs {r['theirs_texts_per_s']:.0f} (x{r['texts_ratio']:.2f}); "
                      f"CLIP_benchmark loop {r['clip_benchmark_source']}; self-checks: {_checks(r)}"]
        elif r.get("kind") == "search":
            from eval_harness import format_markdown
            lines += ["", format_markdown(None, r["rows"])]
        else:
            lines.append(f"- {r['name']}: ok")
    return lines


def targets(state: dict) -> list[str]:
    """Each target with the figure that decides it: met, NOT met, or not measured."""
    t = state.get("targets", {})
    train = [r for name in ("train", "compile") for r in state.get("sections", {}).get(name, {}).get("rows", [])]
    render = state.get("sections", {}).get("render", {}).get("rows", [])
    b32 = [r for r in train if r.get("status") == "ok" and "ViT-B-32" in r.get("model", "")]
    lines = []

    def verdict(name: str, values: list[tuple[str, float]], ok) -> None:
        if not values:
            lines.append(f"- {name}: not measured")
            return
        shown = "; ".join(f"{k}: {v:.3g}" for k, v in values)
        lines.append(f"- {name}: {'met' if all(ok(v) for _, v in values) else 'NOT met'} ({shown})")

    verdict(f"MFU >= {t.get('mfu_lora_b32', 0.45):.0%}, ViT-B/32 LoRA bf16, ours",
            [(r["name"], r["mfu"]) for r in b32 if r["method"] == "lora" and r.get("side") == "ours"
             and r.get("mfu") is not None],
            lambda v: v >= t.get("mfu_lora_b32", 0.45))
    verdict(f"ours >= {t.get('ratio_full_twin_loss', 1.3)}x open_clip images/s, full twin loss",
            [(r["config"], r["ratio_images_per_s"]) for r in b32 if r.get("kind") == "comparison"],
            lambda v: v >= t.get("ratio_full_twin_loss", 1.3))
    verdict(f"render stage overhead <= {t.get('render_overhead', 0.03):.0%} of bare diffusers",
            [(r["name"], r["stage_overhead"]) for r in render if r.get("status") == "ok" and "stage_overhead" in r],
            lambda v: v <= t.get("render_overhead", 0.03))
    return lines


def format_markdown(state: dict) -> str:
    env = state.get("environment", {})
    head = env.get("gpu") or env.get("device", "?")
    lines = [f"# GPU check: {head}" + (" (DRY RUN: tiny sizes, not GPU figures)" if state.get("dry_run") else ""),
             "", f"Started {state.get('started', '?')}, written {state.get('written_at', '?')}; command "
                 f"`{state.get('command', '?')}`. All weights are random (architecture sizes only).", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("weights",)), ""]
    tables = {"train": train_table, "compile": train_table, "render": render_table, "eval": eval_table}
    for name, sec in state.get("sections", {}).items():
        rows: list[dict] = sec.get("rows", [])
        lines += [f"## {name}: {sec.get('status', '?')}" + (f" in {sec['seconds']} s of {sec.get('budget_s')} s"
                                                            if "seconds" in sec else ""), ""]
        if sec.get("error"):
            lines += ["```", str(sec["error"])[-1500:], "```", ""]
        lines += tables[name](rows) + [""]
    lines += ["## Targets", ""] + targets(state)
    failed = failed_checks(state)
    lines += ["", "## Self-checks: " + ("all passed" if not failed else f"{len(failed)} FAILED")] + \
        [f"- {f}" for f in failed]
    return "\n".join(lines) + "\n"


def failed_checks(state: dict) -> list[str]:
    """``row / side / check: detail`` of every failed self-check."""
    out = []
    for sec in state.get("sections", {}).values():
        for r in sec.get("rows", []):
            for k, c in (r.get("checks") or {}).items():
                if not c["ok"]:
                    out.append(f"{r['name']} / {k}: {c['detail']}")
    return out


def environment(device: str) -> dict:
    """GPU name, driver, CUDA, and the versions of the libraries measured."""
    from importlib.metadata import PackageNotFoundError, version

    env: dict = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
                 "cpu_count": os.cpu_count(), "weights": "random (architecture sizes only; nothing downloaded)"}
    for pkg in ("torch", "open_clip_torch", "diffusers", "transformers", "lightning", "faiss-cpu", "faiss-gpu",
                "faiss-gpu-cu12", "timm", "webdataset", "numpy", "cultureclip"):
        try:
            env[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    import torch
    env["torch_cuda"] = torch.version.cuda
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            env["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["driver"] = f"unknown ({exc})"
    return env
