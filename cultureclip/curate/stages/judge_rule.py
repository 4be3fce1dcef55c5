"""The judge's pass rule and its dataset-card section (re-exported by :mod:`cultureclip.curate.stages.judge`).

The judge stage stores raw scores; whether an image passes is decided here, from a rule in config, so
changing a threshold needs no new judge run. The paper's rule is the default: no score of 1, the mean
strictly above 3, and (our addition) the blind twin check picked the image's own concept. A twin pair
is kept when both of its images pass; that part is applied by export.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Optional

from cultureclip import schema
from cultureclip.curate.runner import Store

STAGE = "judge"
DEFAULT_RULE = {"min_score": 2, "min_mean": 3.0, "require_twin_check": True}


def check_rule(rule: Optional[Mapping] = None) -> dict:
    """The pass rule with defaults filled in; unknown keys or bad values raise ValueError."""
    out = dict(DEFAULT_RULE)
    unknown = sorted(set(rule or {}) - set(out))
    if unknown:
        raise ValueError(f"unknown judge rule settings {unknown}; known: {sorted(out)}")
    out.update(rule or {})
    if not 1 <= int(out["min_score"]) <= 5 or not 1.0 <= float(out["min_mean"]) < 5.0:
        raise ValueError(f"judge rule needs 1 <= min_score <= 5 and 1 <= min_mean < 5, got {out}")
    return out


def passes(record: Mapping, rule: Optional[Mapping] = None, checked: bool = False) -> bool:
    """Whether one judged image passes: every score >= ``min_score`` (default 2: no score of 1), the
    mean strictly above ``min_mean`` (default 3.0) and, with ``require_twin_check``, the judge picked
    the image's own concept over its twin. (A twin *pair* is kept when both its images pass: export.)
    ``checked``: ``rule`` is already the output of :func:`check_rule` (export checks it once, not per image)."""
    rule = rule if checked else check_rule(rule)
    scores = [int(record[name]) for name in schema.SCORES]
    if min(scores) < int(rule["min_score"]) or not sum(scores) / len(scores) > float(rule["min_mean"]):
        return False
    return bool(record[schema.PICKS_OWN]) or not rule["require_twin_check"]


def card_section(out_dir: Any, rule: Optional[Mapping] = None) -> Optional[dict]:
    """The dataset card's judge section: counts, errors by reason, pass rates under ``rule`` (each part
    of it alone and together), score histograms and the twin-check accuracy, per category too."""
    store = Store(Path(out_dir) / STAGE, STAGE)
    if not store.has_view():
        return None
    rule = check_rule(rule)
    records, errors = list(store.records()), {e[schema.REC_KEY]: e for e in store.errors()}
    hist = {name: {v: 0 for v in range(1, 6)} for name in schema.SCORES}
    by_category: dict[str, Counter] = {}
    for rec in records:
        for name in schema.SCORES:
            hist[name][int(rec[name])] += 1
        c = by_category.setdefault(rec[schema.CATEGORY], Counter())
        c["judged"] += 1
        c["passed"] += passes(rec, rule)
        c["picks_own"] += bool(rec[schema.PICKS_OWN])
    n = len(records)
    scores_only = {**rule, "require_twin_check": False}
    data = {"judged": n, "errors": len(errors),
            "errors_by_reason": dict(Counter(e[schema.REC_ERROR] for e in errors.values())),
            "rule": rule, "passed": sum(passes(r, rule) for r in records),
            "passed_scores": sum(passes(r, scores_only) for r in records),
            "picks_own": sum(bool(r[schema.PICKS_OWN]) for r in records),
            "histograms": hist, "by_category": {k: dict(v) for k, v in sorted(by_category.items())}}
    pct = lambda k, d=data: f"{100 * d[k] / max(d['judged'], 1):.1f}%"  # noqa: E731
    lines = [f"{n} images judged, {len(errors)} errors {data['errors_by_reason'] or ''}.",
             f"Pass rule: every score >= {rule['min_score']}, mean > {rule['min_mean']}"
             f"{', twin check passed' if rule['require_twin_check'] else ''}.",
             f"- pass on scores: {data['passed_scores']} ({pct('passed_scores')})",
             f"- twin check (picks its own concept): {data['picks_own']} ({pct('picks_own')})",
             f"- pass: {data['passed']} ({pct('passed')})", "",
             "| category | judged | passed | twin check |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['judged']} | {v['passed']} | {v['picks_own']} |" for k, v in data["by_category"].items()]
    lines += ["", "| score | " + " | ".join(map(str, range(1, 6))) + " |", "|---|" + "---|" * 5]
    lines += [f"| {name} | " + " | ".join(str(hist[name][v]) for v in range(1, 6)) + " |" for name in schema.SCORES]
    return {"title": "Judge", "markdown": "\n".join(lines), "data": data}
