"""The dataset card of a curation run: ``card.md`` + ``card.json`` (+ plots and thumbnails in ``card/``).

Built from the current views only: every stage of the chain that made the current caption sets (the
import, or concepts to captions) and render and judge give their counts (jobs, done, rejected and
failed by reason, missing); the pairs, render and judge records give the per-country and per-category
tables, the score histograms and the gallery of rejected images; each stage module may add a section
(``card_section(out_dir)``).
"""
from __future__ import annotations

import importlib
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate import registry
from cultureclip.curate.runner import Store, write_atomic
from cultureclip.curate.sanitize import markdown_cell as cell
from cultureclip.rundir import raise_if_disk_full

log = logging.getLogger(__name__)
CARD_MD, CARD_JSON, CARD_ASSETS = "card.md", "card.json", "card"
UNKNOWN = "(none)"  # the group of records without a country or category
SCORE_VALUES = range(1, 6)


def stage_summary(store: Store) -> dict:
    """Counts of one stage's current view: jobs, done, rejected and errors by reason, missing."""
    st = store.status()
    return {k: st[k] for k in ("jobs", "done", "rejected", "rejected_by_reason", "errors", "errors_by_reason",
                               "missing")}


def stage_stores(out_dir: Path, skip: Sequence[str] = ()) -> list[Store]:
    """The stores of the chain that made the current caption sets, then render and judge, in pipeline order."""
    from cultureclip.curate.stages.importer import STAGE as PAIRS, pairs_store
    source = pairs_store(out_dir).stage
    chain = [PAIRS] if source == PAIRS else [s for s in registry.ORDER if registry.ORDER.index(s) <=
                                             registry.ORDER.index(source)]
    names = chain + ["render", "judge"]
    stores = [Store(Path(out_dir) / n, n) for n in names if n not in skip]
    return [s for s in stores if s.has_view()]


def module_sections(out_dir: Path, names: Sequence[str], options: Optional[Mapping[str, Mapping]] = None) -> list[dict]:
    """``card_section(out_dir, **options[name])`` of the importer and of every stage module named, where
    defined (``options``: what the caller decided that a section must state, e.g. export's pass rule)."""
    sections = []
    for name in names:
        module_name = "cultureclip.curate.stages.importer" if name == "pairs" else registry.STAGES.get(name)
        if module_name is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a package the module needs is missing: that is an error
                raise
            continue  # a folder of a stage whose module this install lacks
        kwargs = dict((options or {}).get(name) or {})
        section = module.card_section(out_dir, **kwargs) if hasattr(module, "card_section") else None
        if section:
            sections.append({"stage": name, **section})
    return sections


def rate(passed: int, total: int) -> Optional[float]:
    """``passed / total`` rounded to 4 digits; None when nothing was counted."""
    return round(passed / total, 4) if total else None


def group_tables(pairs: Sequence[Mapping], renders: Mapping[str, Mapping], judged: Sequence[Mapping],
                 passes: Callable[[Mapping], bool], exported: Iterable[Mapping]) -> dict:
    """Per-category and per-country counts: twin pairs, images rendered, judged, passed, pairs exported.

    A twin pair counts under both of its countries; an image under its own side's country. A field that
    is absent (the reference caption files have no countries; exported metadata leaves empty fields out)
    counts under ``(none)``.
    """
    by_twin = {p[schema.TWIN_ID]: p for p in pairs}
    tables: dict[str, dict] = {schema.CATEGORY: defaultdict(Counter), schema.COUNTRY: defaultdict(Counter)}
    for p in pairs:
        tables[schema.CATEGORY][p.get(schema.CATEGORY) or UNKNOWN]["twin_pairs"] += 1
        for c in {p.get(schema.POS_COUNTRY) or UNKNOWN, p.get(schema.NEG_COUNTRY) or UNKNOWN}:
            tables[schema.COUNTRY][c]["twin_pairs"] += 1
    for r in renders.values():
        tables[schema.CATEGORY][r.get(schema.CATEGORY) or UNKNOWN]["images_rendered"] += 1
        tables[schema.COUNTRY][r.get(schema.COUNTRY) or UNKNOWN]["images_rendered"] += 1
    for j in judged:
        pair = by_twin[j[schema.TWIN_ID]]
        country = pair.get(f"{j[schema.SIDE]}_{schema.COUNTRY}") or UNKNOWN
        for table, value in ((schema.CATEGORY, pair.get(schema.CATEGORY) or UNKNOWN), (schema.COUNTRY, country)):
            tables[table][value]["images_judged"] += 1
            tables[table][value]["images_passed"] += int(passes(j))
    for e in exported:
        tables[schema.CATEGORY][e.get(schema.CATEGORY) or UNKNOWN]["pairs_exported"] += 1
        for c in {e.get(schema.POS_COUNTRY) or UNKNOWN, e.get(schema.NEG_COUNTRY) or UNKNOWN}:
            tables[schema.COUNTRY][c]["pairs_exported"] += 1
    out = {}
    for table, groups in tables.items():
        out[table] = {}
        for value in sorted(groups):
            row = {k: groups[value][k] for k in ("twin_pairs", "images_rendered", "images_judged", "images_passed",
                                                 "pairs_exported")}
            row["pass_rate"] = rate(row["images_passed"], row["images_judged"])
            out[table][value] = row
    return out


def score_histograms(judged: Sequence[Mapping]) -> dict:
    """``{score: {1: n, ..., 5: n}}`` for the three scores, plus the twin check ``{own, twin}``."""
    hist = {s: {v: 0 for v in SCORE_VALUES} for s in schema.SCORES}
    for j in judged:
        for s in schema.SCORES:
            hist[s][j[s]] += 1
    hist[schema.PICKS_OWN] = {"own": sum(bool(j[schema.PICKS_OWN]) for j in judged),
                              "twin": sum(not j[schema.PICKS_OWN] for j in judged)}
    return hist


def plot_histograms(hist: Mapping, path: Path) -> None:
    """One bar chart per score and one for the twin check, in one PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(hist), figsize=(3.2 * len(hist), 2.8))
    for ax, (name, counts) in zip(axes, hist.items()):
        ax.bar(range(len(counts)), list(counts.values()), color="#4c72b0")
        ax.set_xticks(range(len(counts)), [str(k) for k in counts])
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("images")
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.1, top=0.88, wspace=0.35)  # tight_layout costs seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=80)
    except OSError as exc:
        raise_if_disk_full(exc, str(path))
        raise
    finally:
        plt.close(fig)


def thumbnail(src: Path, dest: Path, size: int) -> None:
    """A JPEG thumbnail (longer side ``size``) of a rendered image."""
    from PIL import Image

    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            im.save(dest, format="JPEG", quality=85)
        except OSError as exc:
            raise_if_disk_full(exc, str(dest))
            raise


def _table_md(title: str, rows: Mapping[str, Mapping], first: str) -> list[str]:
    if not rows:
        return []
    cols = list(next(iter(rows.values())))
    lines = [f"### {title}", "", "| " + " | ".join([first, *cols]) + " |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join([cell(k), *("" if v is None else cell(v) for v in row.values())]) + " |"
              for k, row in rows.items()]
    return lines + [""]


def render_markdown(card: Mapping[str, Any]) -> str:
    """``card.md`` from the card's JSON."""
    ex = card["export"]
    lines = ["# Twin-pair dataset card", "",
             f"{ex['train_pairs']} training pairs and {ex['val_pairs']} validation pairs from "
             f"{ex['twins_exported']} of {ex['twin_pairs']} twin pairs (split by twin pair). "
             f"Pass rule: {card['rule']}.",
             f"Split: {ex['split_rule']}.", "", "## Stages", "",
             "| stage | current jobs | done | rejected | errors | missing | rejected by reason | errors by reason |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in card["stages"].items():
        lines.append(f"| {cell(name)} | {s['jobs']} | {s['done']} | {s['rejected']} | {s['errors']} | {s['missing']} | "
                     f"{cell(', '.join(f'{k}: {v}' for k, v in s['rejected_by_reason'].items()))} | "
                     f"{cell(', '.join(f'{k}: {v}' for k, v in s['errors_by_reason'].items()))} |")
    j = card["judge"]
    lines += ["", f"Judge: {j['images_passed']} of {j['images_judged']} judged images pass "
              f"(pass rate {j['pass_rate']}); twin check picks the image's own concept for "
              f"{j['histograms'][schema.PICKS_OWN]['own']} of them.", ""]
    lines += _table_md("Per category", card["groups"][schema.CATEGORY], schema.CATEGORY)
    lines += _table_md("Per country", card["groups"][schema.COUNTRY], schema.COUNTRY)
    if card.get("histogram_png"):
        lines += ["## Judge scores", "", f"![score histograms]({card['histogram_png']})", ""]
    if card["gallery"]:
        lines += [f"## Rejected images ({len(card['gallery'])} of {j['images_judged'] - j['images_passed']})", "",
                  "| image | concept | twin | scores (A/C/F) | twin choice | rejected because | judge's reason |",
                  "|---|---|---|---|---|---|---|"]
        for g in card["gallery"]:
            scores = "/".join(str(g[s]) for s in schema.SCORES)
            # every cell is escaped: concept names come from data, the reason from the judge server
            lines.append(f"| ![]({g['thumbnail']}) | {cell(g[schema.CONCEPT])} | {cell(g[schema.TWIN_CONCEPT])} | "
                         f"{cell(scores)} | {cell(g[schema.TWIN_CHOICE])} | {cell('; '.join(g['failures']))} | "
                         f"{cell(g[schema.REASON])} |")
        lines.append("")
    for section in card["sections"]:
        lines += [f"## {section['title']}", "", section["markdown"], ""]
    return "\n".join(lines)


def write_card(dest: Path, card: Mapping[str, Any]) -> None:
    """Write ``card.json`` and ``card.md`` into ``dest``."""
    write_atomic(dest / CARD_JSON, json.dumps(card, indent=1, ensure_ascii=False))
    write_atomic(dest / CARD_MD, render_markdown(card))
