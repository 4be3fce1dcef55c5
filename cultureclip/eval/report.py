"""The report of a results folder: ``report.md`` with metric tables, and PNG plots.

Every function takes result dicts (:func:`cultureclip.eval.aggregate.load_result`), never a folder or a
config, so the comparison notebook draws the same plots for two models side by side:
``plot_group_bars(result_a, result_b, group="country", labels=("base", "fine-tuned"))``. Plots are
bare ``matplotlib.figure.Figure`` objects on the Agg canvas (no pyplot state, works headless).

- :func:`plot_group_bars`: accuracy per group value (country, category, region, ...), sorted, with counts;
- :func:`plot_twin_confusion`: top-1 predictions among the concepts of the most confused twin pairs;
- :func:`plot_gallery`: the worst twin confusions (image, own concept, chosen twin), fetched from the
  twin shards by sample key (``extra["shards"]`` and ``extra["predictions"]`` of a ``twins`` result);
- :func:`plot_summary`: the main metric of every task (cultural and general), models side by side.
"""
from __future__ import annotations

import math
import os
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cultureclip import schema
from cultureclip.eval.aggregate import load_results
from cultureclip.images import decode_image

# the headline metric of a result: the first of these it reports (twins, cultural benchmarks, ImageNet, retrieval)
MAIN_METRICS = ("twin_acc", "acc", "acc1", "i2t_recall@1", "t2i_recall@1")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key.ext split (base_plus_ext)


def main_metric(result: Mapping) -> Optional[str]:
    """The headline metric name of a result, or None."""
    return next((m for m in MAIN_METRICS if m in result["metrics"]), None)


def overall_metrics(result: Mapping) -> dict:
    """Metrics that are not per-group breakdowns (no ``/`` in the key)."""
    return {k: v for k, v in result["metrics"].items() if "/" not in k}


def groups(result: Mapping, metric: Optional[str] = None) -> list[str]:
    """Group names with per-value scores and counts (``twin_acc/country=Japan`` + ``n/country=Japan``)."""
    metric = metric or main_metric(result)
    found = {m.group(1) for k in result["metrics"] if (m := re.match(rf"^{re.escape(str(metric))}/([^=]+)=", k))}
    return sorted(g for g in found if any(k.startswith(f"n/{g}=") for k in result["metrics"]))


def group_scores(result: Mapping, group: str, metric: Optional[str] = None) -> list[tuple[str, float, Optional[int]]]:
    """``[(value, score, count)]`` of one group, best score first (ties by value)."""
    metric = metric or main_metric(result)
    prefix, metrics = f"{metric}/{group}=", result["metrics"]
    rows = [(k[len(prefix):], float(v), metrics.get(f"n/{group}={k[len(prefix):]}"))
            for k, v in metrics.items() if k.startswith(prefix)]
    return sorted(rows, key=lambda r: (-r[1] if math.isfinite(r[1]) else math.inf, r[0]))


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    fig = Figure(figsize=(width, height), layout="constrained")  # fits long tick labels and legends
    FigureCanvasAgg(fig)  # explicit Agg canvas: PNG output without pyplot or a display
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _labels(results: Sequence[Mapping], labels: Optional[Sequence[str]]) -> list[str]:
    return list(labels) if labels else [f"{r['model']} ({r['pretrained']})" if r.get("pretrained") else
                                        str(r["model"]) for r in results]


def plot_group_bars(*results: Mapping, group: str, metric: Optional[str] = None,
                    labels: Optional[Sequence[str]] = None, max_bars: int = 30) -> Figure:
    """Horizontal bars of a metric per group value, one bar per result, sorted by the first result.

    Args:
        *results: one result per model (same task), e.g. base and fine-tuned.
        group: ``country``, ``category``, ``region``, ``continent``, ...
        metric: default the first result's main metric.
        labels: legend names (default: model and pretrained tag).
        max_bars: at most this many values, those with the most images (title says so when cut).
    """
    metric = metric or main_metric(results[0])
    first = group_scores(results[0], group, metric)
    if len(first) > max_bars:  # keep the best-supported values, still in score order
        keep = {v for v, _, n in sorted(first, key=lambda r: -(r[2] or 0))[:max_bars]}
        first = [r for r in first if r[0] in keep]
    values = [v for v, _, _ in first][::-1]  # barh draws bottom-up: best at the top
    fig, axes = _figure(7, 1.0 + 0.28 * len(values) * max(1, len(results)) ** 0.5)
    ax, height = axes[0, 0], 0.8 / len(results)
    for j, (res, label) in enumerate(zip(results, _labels(results, labels))):
        scores = {v: (s, n) for v, s, n in group_scores(res, group, metric)}
        ys = [i + ((len(results) - 1) / 2 - j) * height for i in range(len(values))]  # first result on top
        xs = [scores.get(v, (math.nan, None))[0] for v in values]
        bars = ax.barh(ys, xs, height=height, label=label)
        ax.bar_label(bars, [f"n={scores[v][1]}" if v in scores and scores[v][1] is not None else ""
                            for v in values], padding=2, fontsize=7)
    ax.set_yticks(range(len(values)), values, fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(metric)
    cut = f" ({len(values)} with most images of {len(group_scores(results[0], group, metric))})" \
        if len(values) < len(group_scores(results[0], group, metric)) else ""
    ax.set_title(f"{results[0]['task']}: {metric} per {group}{cut}", fontsize=10)
    if len(results) > 1:
        fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=len(results), fontsize=8)
    return fig


def most_confused_pairs(result: Mapping, top_pairs: int = 6) -> list[tuple[str, str]]:
    """The twin pairs whose images most often score the twin's name above their own (lowest twin accuracy)."""
    hits, counts = Counter(), Counter()
    for p in result.get("extra", {}).get("predictions", []):
        pair = tuple(sorted((p["concept"], p["twin"])))
        counts[pair] += 1
        hits[pair] += bool(p["twin_correct"])
    return sorted(counts, key=lambda pair: (hits[pair] / counts[pair], pair))[:top_pairs]


def twin_confusion_matrix(result: Mapping, concepts: Sequence[str]) -> list[list[float]]:
    """Rows: true concept; columns: top-1 prediction among ``concepts`` + "other"; each row sums to 1."""
    index = {c: i for i, c in enumerate(concepts)}
    counts = [[0] * (len(concepts) + 1) for _ in concepts]
    for p in result.get("extra", {}).get("predictions", []):
        if p["concept"] in index:
            counts[index[p["concept"]]][index.get(p["predicted"], len(concepts))] += 1
    return [[c / max(1, sum(row)) for c in row] for row in counts]


def plot_twin_confusion(*results: Mapping, top_pairs: int = 6, labels: Optional[Sequence[str]] = None) -> Figure:
    """Heatmaps of top-1 predictions among the concepts of the first result's most confused twin pairs."""
    concepts = [c for pair in most_confused_pairs(results[0], top_pairs) for c in pair]
    size = 1.8 + 0.42 * (len(concepts) + 1)
    fig, axes = _figure(size * len(results) + 0.6, size + 0.6, ncols=len(results))
    for ax, res, label in zip(axes[0], results, _labels(results, labels)):
        matrix = twin_confusion_matrix(res, concepts)
        ax.imshow(matrix or [[0.0]], vmin=0, vmax=1, cmap="Blues")  # cells are annotated: no colorbar
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v > 0:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > .6 else "k")
        ax.set_xticks(range(len(concepts) + 1), [*concepts, "other"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(concepts)), concepts, fontsize=7)
        ax.set_xlabel("top-1 prediction", fontsize=8)
        ax.set_title(label, fontsize=9)
    fig.suptitle("top-1 prediction share among the most confused twin pairs (rows sum to 1)", fontsize=9)
    return fig


def fetch_images(shards: Sequence[Union[str, os.PathLike]], wanted: Sequence[tuple[str, str]]) -> dict:
    """``{(key, role): PIL image}`` read from the twin shards' tar members (``key.pos.jpg``)."""
    want, found = set(wanted), {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if not m or not member.isfile():
                    continue
                role, _, ext = m.group(2).partition(".")
                if (m.group(1), role) in want and ext in schema.IMAGE_EXTS:
                    found[(m.group(1), role)] = decode_image(tar.extractfile(member).read(), f"{shard}:{member.name}")
        if len(found) == len(want):
            break
    return found


def worst_confusions(result: Mapping, n: int = 6) -> list[dict]:
    """Images whose twin's name scored above their own, most negative margin first; the worst image of
    each concept comes before a second image of any concept, so the gallery shows ``n`` different mistakes."""
    preds = sorted((p for p in result.get("extra", {}).get("predictions", []) if not p["twin_correct"]),
                   key=lambda p: p["twin_margin"])
    seen: Counter = Counter()
    ranked = []
    for p in preds:  # rank = how many worse images of the same concept came before
        ranked.append((seen[p["concept"]], p["twin_margin"], len(ranked), p))
        seen[p["concept"]] += 1
    return [p for *_, p in sorted(ranked, key=lambda t: t[:3])[:n]]


def plot_gallery(*results: Mapping, n: int = 6, labels: Optional[Sequence[str]] = None) -> Figure:
    """One row per result: its ``n`` worst twin confusions, titled with own concept and chosen twin.

    Raises:
        FileNotFoundError: the shards recorded in the result are not on this machine.
    """
    rows = [worst_confusions(r, n) for r in results]
    fig, axes = _figure(1.9 * max(1, n), 2.3 * len(results), ncols=max(1, n), nrows=len(results))
    for r, (res, preds, label) in enumerate(zip(results, rows, _labels(results, labels))):
        images = fetch_images(res.get("extra", {}).get("shards", []), [(p["key"], p["role"]) for p in preds])
        for c, ax in enumerate(axes[r]):
            ax.axis("off")
            if c < len(preds):
                p = preds[c]
                if (p["key"], p["role"]) in images:
                    ax.imshow(images[(p["key"], p["role"])])
                ax.set_title(f"{p['concept']}\nchose {p['twin']}\n({p['twin_margin']:+.3f})", fontsize=7)
        axes[r][0].text(-0.1, 0.5, label, transform=axes[r][0].transAxes, rotation=90, ha="right", va="center",
                        fontsize=8)
    fig.suptitle("worst twin confusions: own concept, chosen twin (own - twin score)", fontsize=9)
    return fig


def plot_summary(results_by_model: Mapping[str, Sequence[Mapping]]) -> Figure:
    """The main metric of every task, one bar per model (``{label: [results]}``)."""
    scores: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for label, results in results_by_model.items():
        for r in results:
            metric = main_metric(r)
            if metric is not None:
                scores[(r["task"], metric)][label] = float(r["metrics"][metric])
    tasks, models = sorted(scores), list(results_by_model)
    fig, axes = _figure(1.6 + 1.3 * max(1, len(tasks)) * max(1, len(models)) ** 0.5, 3.6)
    ax, width = axes[0, 0], 0.8 / max(1, len(models))
    for j, label in enumerate(models):
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax.bar(xs, [scores[t].get(label, math.nan) for t in tasks], width=width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(range(len(tasks)), [f"{t}\n{m}" for t, m in tasks], fontsize=7)
    ax.set_ylim(0, 1.1)
    ax.set_title("main metric per task", fontsize=10)
    if len(models) > 1:
        ax.legend(fontsize=8)
    return fig


def compare_markdown(results_a: Sequence[Mapping], results_b: Sequence[Mapping],
                     labels: Sequence[str] = ("A", "B")) -> str:
    """A Markdown table of the overall metrics of the tasks both models have, with ``B - A``."""
    b_by_task = {r["task"]: r for r in results_b}
    rows = []
    for a in sorted(results_a, key=lambda r: r["task"]):
        b = b_by_task.get(a["task"])
        for name, va in sorted(overall_metrics(a).items()) if b is not None else ():
            vb = b["metrics"].get(name)
            delta = vb - va if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            rows.append((a["task"], name, va, vb, delta))
    return "\n".join(_table(["task", "metric", labels[0], labels[1], f"{labels[1]} - {labels[0]}"], rows))


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows], ""]


def _save(fig: Figure, path: Path) -> str:
    fig.savefig(path, dpi=110)
    return path.name


def write_report(folder: Union[str, os.PathLike], results: Optional[Sequence[Mapping]] = None) -> Path:
    """Write ``report.md`` and its PNGs into ``folder``.

    Args:
        folder: the results folder (PNGs are named after each result file's stem).
        results: result dicts to report; default: every result JSON in ``folder``.

    Returns:
        The path of ``report.md``.
    """
    folder = Path(folder)
    results = list(results) if results is not None else load_results(folder)[0]
    by_model: dict[str, list] = defaultdict(list)
    for r in results:
        by_model[_labels([r], None)[0]].append(r)
    lines = [f"# Evaluation report: {', '.join(sorted(by_model))}", ""]
    if results:
        versions = ", ".join(f"{k} {v}" for k, v in results[0].get("versions", {}).items())
        summary = _save(plot_summary(by_model), folder / "summary.png")
        lines += [f"Results: `{folder}`; versions: {versions}", "", f"![summary]({summary})", ""]
        lines += _table(["task", "dataset", "split", "n", "metric", "value"],
                        [(r["task"], r["dataset"], r["split"], r["n"], main_metric(r),
                          r["metrics"].get(main_metric(r))) for r in results])
    for r in results:
        stem = Path(r.get("path", r["task"])).stem
        lines += [f"## {r['task']}", "", f"dataset `{r['dataset']}`, split `{r['split']}`, revision "
                  f"`{r['revision']}`, seed `{r['seed']}`, n = {r['n']}", ""]
        lines += _table(["metric", "value"], sorted(overall_metrics(r).items()))
        for group in (g for g in groups(r) if len(group_scores(r, g)) > 1):  # one value: the overall number
            lines += [f"### {main_metric(r)} per {group}", "",
                      f"![{group}]({_save(plot_group_bars(r, group=group), folder / f'{stem}_{group}.png')})", ""]
            lines += _table([group, main_metric(r), "n"], group_scores(r, group))
        extra = r.get("extra", {})
        if extra.get("confusions"):
            lines += ["### Most frequent top-1 confusions", ""]
            lines += _table(["concept", "predicted", "count", "twin"],
                            [(c["concept"], c["predicted"], c["count"], c["is_twin"]) for c in extra["confusions"]])
        if extra.get("predictions"):
            lines += [f"![confusion]({_save(plot_twin_confusion(r), folder / f'{stem}_confusion.png')})", ""]
            try:
                lines += [f"![gallery]({_save(plot_gallery(r), folder / f'{stem}_gallery.png')})", ""]
            except (FileNotFoundError, tarfile.TarError) as e:  # results copied away from their shards
                lines += [f"(gallery not drawn: {e})", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
