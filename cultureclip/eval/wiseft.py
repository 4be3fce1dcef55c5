"""WiSE-FT: weight-space ensembling of a zero-shot and a fine-tuned model.

Wortsman et al., "Robust fine-tuning of zero-shot models" (CVPR 2022): the weights
``theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned`` often keep most of the
fine-tuning gain while recovering the base model's general (forgetting-check) accuracy. A sweep
over ``alpha`` traces the trade-off curve between a target metric (cultural twins) and a general
one (ImageNet, COCO retrieval); :func:`plot_tradeoff` draws it.

Both models must share the architecture and every tensor key and shape; LoRA adapters must be
merged first (``model.merge_lora()``), because adapter tensors have no counterpart in the base
model. Tensors that are equal in both models are copied, not recomputed, so ``alpha=0`` and
``alpha=1`` reproduce the two models exactly (``1 * x + 0 * y == x`` holds in floating point
for finite values, and equal buffers such as masks with ``-inf`` stay untouched).
"""
from __future__ import annotations

import math
import os
from copy import deepcopy
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from cultureclip.model import CultureCLIP


def _check_compatible(base: CultureCLIP, finetuned: CultureCLIP) -> None:
    for which, m in (("base", base), ("finetuned", finetuned)):
        if m.has_lora:
            raise ValueError(f"the {which} model has LoRA adapters; call merge_lora() before interpolating")
    if base.model_cfg != finetuned.model_cfg:
        diff = sorted(k for k in set(base.model_cfg) | set(finetuned.model_cfg)
                      if base.model_cfg.get(k) != finetuned.model_cfg.get(k))
        raise ValueError(f"the models have different architectures (model_cfg differs in {diff})")
    a, b = base.model.state_dict(), finetuned.model.state_dict()
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise ValueError(f"state dict keys differ: only in base {only_a[:5]}, only in finetuned {only_b[:5]}")
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        raise ValueError(f"tensor shapes differ for {shapes[:5]}")


def interpolate(base: CultureCLIP, finetuned: CultureCLIP, alpha: float) -> CultureCLIP:
    """A new model with weights ``(1 - alpha) * base + alpha * finetuned`` (the inputs are untouched).

    Args:
        base: the zero-shot (pre-fine-tuning) model.
        finetuned: the fine-tuned model, same architecture, adapters merged.
        alpha: mixing weight; 0 gives ``base``, 1 gives ``finetuned``. Values outside [0, 1]
            extrapolate, which is allowed but rarely useful.

    Returns:
        A new model on ``base``'s device and dtype holding the mix; it shares ``base``'s tokenizer
        and transforms.

    Raises:
        ValueError: LoRA adapters present, different ``model_cfg``, keys or shapes, or a non-finite alpha.
    """
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    _check_compatible(base, finetuned)
    a, b = base.model.state_dict(), finetuned.model.state_dict()
    mixed = {}
    for k, x in a.items():
        y = b[k].to(x.device)
        if torch.equal(x, y.to(x.dtype)) or not x.is_floating_point():
            mixed[k] = x.clone()  # frozen weights and buffers; integer counters are taken from base
        else:
            # float32 arithmetic so half-precision models mix without extra rounding
            mixed[k] = ((1.0 - alpha) * x.float() + alpha * y.float()).to(x.dtype)
    # share the stateless tokenizer and transforms: deep-copying the BPE tables costs more than the weights
    model = deepcopy(base.model)
    model.load_state_dict(mixed, strict=True)
    return CultureCLIP(model, base.preprocess_train, base.preprocess_val, base.tokenizer, deepcopy(base.model_cfg),
                       name=f"{base.name}-wiseft{alpha:g}")


def sweep(base: CultureCLIP, finetuned: CultureCLIP, alphas: Sequence[float],
          evaluate_fn: Callable[[CultureCLIP], Mapping[str, float]]) -> list[dict]:
    """Evaluate the interpolated model at every ``alpha``.

    Args:
        base, finetuned: as for :func:`interpolate`.
        alphas: mixing weights, evaluated in the order given.
        evaluate_fn: model -> flat metric dict (e.g. a closure over :func:`cultureclip.eval.general.imagenet_zeroshot`).

    Returns:
        One dict per alpha: ``{"alpha": alpha, **metrics}``.
    """
    _check_compatible(base, finetuned)  # fail before the first (possibly long) evaluation
    rows = []
    for alpha in alphas:
        model = interpolate(base, finetuned, alpha)
        metrics = dict(evaluate_fn(model))
        if "alpha" in metrics:
            raise ValueError("evaluate_fn returned a metric named 'alpha', which the sweep reserves")
        rows.append({"alpha": float(alpha), **metrics})
        del model  # one interpolated copy in memory at a time
    return rows


def plot_tradeoff(rows: Sequence[Mapping[str, float]], x_metric: str, y_metric: str,
                  path: Union[str, os.PathLike], title: Optional[str] = None) -> Path:
    """Draw ``y_metric`` against ``x_metric`` over a sweep, each point labelled with its alpha.

    Needs matplotlib (an optional dependency, imported here only). Draws on a bare
    ``matplotlib.figure.Figure``, so it works headless and leaves pyplot's state alone.

    Args:
        rows: output of :func:`sweep`.
        x_metric, y_metric: metric keys, e.g. ``"acc1"`` (general) and ``"twin_acc"`` (target).
        path: image file to write (format from the suffix: ``.png``, ``.pdf``, ``.svg``).
        title: optional figure title.

    Returns:
        ``path``.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_tradeoff needs matplotlib: pip install matplotlib") from exc
    missing = [m for m in (x_metric, y_metric) for r in rows if m not in r]
    if missing:
        raise KeyError(f"rows lack metric(s) {sorted(set(missing))}")
    rows = sorted(rows, key=lambda r: r["alpha"])
    xs, ys = [r[x_metric] for r in rows], [r[y_metric] for r in rows]
    # a bare Figure (no pyplot): no global backend switch, no open-figure bookkeeping in notebooks
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    ax.plot(xs, ys, "-o", color="tab:blue")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"alpha={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(x_metric)
    ax.set_ylabel(y_metric)
    ax.set_title(title or f"WiSE-FT: {y_metric} vs {x_metric}")
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# a task: model -> (flat metrics, result header, extra), as the functions of cultureclip.eval.tasks
TaskFn = Callable[[CultureCLIP], tuple]


def task_metrics(model: CultureCLIP, task_fns: Mapping[str, TaskFn]) -> dict[str, float]:
    """Run every task on ``model``; its numeric metrics as ``{"<task key>/<metric>": value}``."""
    out = {}
    for key, fn in task_fns.items():
        metrics = fn(model)[0]
        out.update({f"{key}/{name}": float(v) for name, v in metrics.items() if isinstance(v, (int, float))})
    return out


def headline_columns(rows: Sequence[Mapping[str, float]]) -> list[str]:
    """The metrics a summary table shows: each task's own top-level ones (no per-group breakdowns
    such as ``twin_acc/country=Japan``, no counts such as ``n`` or ``n_skipped``)."""
    keys = [k for k in rows[0] if k != "alpha"] if rows else []
    return [k for k in keys if "/" not in k.split("/", 1)[1] and not k.split("/", 1)[1].startswith("n")]


def write_tradeoff(rows: Sequence[Mapping[str, float]], out_dir: Union[str, os.PathLike],
                   columns: Optional[Sequence[str]] = None, meta: Optional[Mapping] = None) -> dict[str, Path]:
    """Write the sweep as ``wiseft.csv`` (all metrics), ``wiseft.md`` (``columns``) and ``wiseft.json``.

    Args:
        rows: output of :func:`sweep` (one dict per alpha, same keys in every row).
        out_dir: folder (created).
        columns: metric keys of the markdown table; default :func:`headline_columns`.
        meta: recorded in the JSON next to the rows (models, tasks, alphas).

    Returns:
        ``{"csv": path, "md": path, "json": path}``.
    """
    import csv
    import json
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ["alpha"] + sorted({k for r in rows for k in r if k != "alpha"})
    with open(out / "wiseft.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    cols = list(columns) if columns else headline_columns(rows)
    missing = sorted({c for c in cols for r in rows if c not in r})
    if missing:
        raise KeyError(f"eval.wiseft.columns names metrics the tasks did not return: {missing}; "
                       f"available: {keys[1:]}")
    lines = ["| alpha | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {r['alpha']:g} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |" for r in rows]
    (out / "wiseft.md").write_text("\n".join(lines) + "\n")
    (out / "wiseft.json").write_text(json.dumps({**dict(meta or {}), "rows": list(rows)}, indent=2, default=str))
    return {"csv": out / "wiseft.csv", "md": out / "wiseft.md", "json": out / "wiseft.json"}


def run_wiseft(base: CultureCLIP, finetuned: CultureCLIP, task_fns: Mapping[str, TaskFn], alphas: Sequence[float],
               out_dir: Union[str, os.PathLike], x_metric: str = "alpha", y_metric: Optional[str] = None,
               columns: Optional[Sequence[str]] = None, meta: Optional[Mapping] = None,
               only: Optional[Sequence[str]] = None) -> dict[str, Path]:
    """The WiSE-FT command's work: sweep ``alphas``, run every task at each, write table and plot.

    Args:
        base, finetuned: as for :func:`interpolate` (LoRA adapters of ``finetuned`` are merged here).
        task_fns: ``{key: model -> (metrics, header, extra)}`` (the ``eval.tasks`` of the config).
        alphas: mixing weights, evaluated in this order.
        out_dir: receives ``wiseft.csv``/``.md``/``.json`` and ``wiseft.png``.
        x_metric, y_metric: plot axes, ``"alpha"`` or ``"<task key>/<metric>"``; default y: the
            first headline metric.
        columns, meta: as for :func:`write_tradeoff`.
        only: run only these keys of ``task_fns`` (None: all).

    Returns:
        The paths written (``csv``, ``md``, ``json``, ``plot``), each printed.
    """
    if only is not None:
        unknown = sorted(set(only) - set(task_fns))
        if unknown:
            raise KeyError(f"eval.wiseft.tasks names {unknown}, which eval.tasks does not hold ({sorted(task_fns)})")
        task_fns = {k: task_fns[k] for k in only}
    if not task_fns:
        raise ValueError("no evaluation tasks for the WiSE-FT sweep: add some, e.g. eval=[wiseft,toy_general]")
    if finetuned.has_lora:
        finetuned.merge_lora()
    rows = sweep(base, finetuned, alphas, lambda model: task_metrics(model.eval(), task_fns))
    paths = write_tradeoff(rows, out_dir, columns, meta)
    y_metric = y_metric or (list(columns) if columns else headline_columns(rows))[0]
    paths["plot"] = plot_tradeoff(rows, x_metric, y_metric, Path(out_dir) / "wiseft.png")
    for kind, path in paths.items():
        print(f"wiseft {kind}: {path}")
    return paths
