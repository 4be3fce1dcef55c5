"""Stage ``export``: twin-pair WebDataset shards and the dataset card from the judged renders.

Per twin pair, every passing image of the positive side is paired with every passing image of the
negative side (both must pass: the pass rule, the twin check included), and ``pairs_per_twin`` of
these combinations are sampled (seeded by the twin id and the run's seed, so a rerun picks the same).
Whole twin pairs go to ``val`` or ``train`` (no concept pair leaks across) by a stable rule: a twin pair
is in val iff a hash of its twin id and the split seed falls below ``val_fraction``
(:func:`~cultureclip.curate.runner.keys.in_val`), so adding or removing twin pairs never moves another
pair between the splits. Only the current views of pairs, render and judge are read, each once.
Pairs are written in ``pair_id`` order by :class:`~cultureclip.data.shards.TwinShardWriter`, each
image as rendered (or shrunk with ``resize``), with the captions, concepts, countries, category,
contexts and features in the pair's json.

Output, ``<out_dir>/export/``: ``train/`` and ``val/`` (shards + ``sizes.json``), ``card.md``,
``card.json``, ``card/`` (plots, thumbnails), ``reports/``, ``stage.json``, and with ``formats=[wds,hf]``
a Hugging Face ``datasets`` folder ``hf/`` (:mod:`cultureclip.curate.stages.export_hf`). It is built in a hidden
folder beside it and renamed into place at the end, so a crash leaves the previous export (or none),
never half of one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from cultureclip import schema
from cultureclip.curate import card as C
from cultureclip.curate.stages.importer import load_pairs, pairs_store
from cultureclip.curate.stages.judge_rule import check_rule, passes  # the judge's rule (re-exported by curate.judge)
from cultureclip.curate.runner import StageReport, Store, digest, in_val, job_id, seed_from_key, write_atomic
from cultureclip.curate.runner.store import STAGE_FILE
from cultureclip.curate.stages.settings import Export as ExportSettings, typed
from cultureclip.curate.stages import export_hf
from cultureclip.data.shards import TwinShardWriter

log = logging.getLogger(__name__)
NAME, RENDER, JUDGE = "export", "render", "judge"
TRAIN, VAL = "train", "val"
SPLIT_RULE = ("a twin pair is in val iff sha256(canonical JSON of [\"split\", {seed}, twin_id]) read as a number in "
              "[0, 1) is below {f}; it depends on the pair's own id and the seed only, so adding or removing pairs "
              "never moves another pair between train and val")
DEFAULTS = asdict(ExportSettings())  # the defaults live in stages/settings.py


def _plain(obj: Any) -> Any:
    """Plain dicts and lists from any mappings and sequences (e.g. OmegaConf containers)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def config(cfg: Optional[Mapping]) -> dict:
    """The stage settings: ``DEFAULTS`` overridden by ``cfg``; unknown keys are refused."""
    given = _plain(cfg or {})
    out = {**typed(ExportSettings, given, "export"), "rule": check_rule(given.get("rule"))}
    out["formats"] = export_hf.check_formats(out["formats"])
    k, f = out["pairs_per_twin"], out["val_fraction"]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"export.pairs_per_twin must be a positive integer or null (all), got {k!r}")
    if not 0.0 <= float(f) < 1.0:
        raise ValueError(f"export.val_fraction must be in [0, 1), got {f!r}")
    return out


def rule_failures(record: Mapping, rule: Mapping) -> list[str]:
    """Why a judged image fails the pass rule of :func:`~cultureclip.curate.stages.judge_rule.passes`, in words
    for the card's gallery: a score below ``min_score``, a mean not above ``min_mean``, the twin check."""
    scores = [record[s] for s in schema.SCORES]
    out = [f"{s}={record[s]} < {rule['min_score']}" for s in schema.SCORES if record[s] < rule["min_score"]]
    mean = sum(scores) / len(scores)
    if not mean > rule["min_mean"]:
        out.append(f"mean {mean:.2f} not above {rule['min_mean']}")
    if rule["require_twin_check"] and not record[schema.PICKS_OWN]:
        out.append(f"twin check picked {record[schema.TWIN_CHOICE]!r}")
    return out


class _Images:
    """The rendered images of a run, each checked against its record's sha256 once (shards and gallery)."""

    def __init__(self, out_dir: Path) -> None:
        self.root, self.checked = out_dir / RENDER, set()

    def path(self, render: Mapping) -> Path:
        path = self.root / render[schema.IMAGE_FILE]
        if path in self.checked:
            return path
        if not path.is_file():
            raise FileNotFoundError(f"{path} (render record {render[schema.REC_KEY]}) is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != render[schema.IMAGE_SHA256]:
            raise ValueError(f"{path} does not match the sha256 of render record {render[schema.REC_KEY]} "
                             f"(changed since it was rendered)")
        self.checked.add(path)
        return path


JUDGE_FIELDS = (schema.REC_KEY, schema.RENDER_KEY, schema.TWIN_ID, schema.SIDE, schema.IMAGE_SHA256, *schema.SCORES,
                schema.PICKS_OWN, schema.TWIN_CHOICE, schema.REASON, schema.MODEL_ID)  # what export and its card use
RENDER_FIELDS = (schema.REC_KEY, schema.CAPTION, schema.CATEGORY, schema.COUNTRY, schema.IMAGE_FILE,
                 schema.IMAGE_SHA256, schema.MODEL_ID)


def build_pairs(pairs: list[dict], renders: Mapping[str, dict], judged: list[dict], rule: Mapping,
                pairs_per_twin: Optional[int], seed: int) -> list[dict]:
    """The exported pairs (unsorted): ``{pair_id, twin_id, pos, neg}`` each (render keys; the json of a
    pair is made when it is written, :func:`pair_meta`, so a million rows hold no copies of it)."""
    by_twin = {p[schema.TWIN_ID]: p for p in pairs}
    good: dict[str, dict[str, list[str]]] = defaultdict(lambda: {schema.POS_PREFIX: [], schema.NEG_PREFIX: []})
    for j in judged:
        if j[schema.TWIN_ID] not in by_twin:  # the views were checked to be current: this is damage
            raise ValueError(f"judge record {j[schema.REC_KEY]} is of twin pair {j[schema.TWIN_ID]}, which is not in "
                             f"the current caption pairs")
        if j[schema.RENDER_KEY] not in renders:
            raise ValueError(f"judge record {j[schema.REC_KEY]} names render {j[schema.RENDER_KEY]}, which has no "
                             f"render record")
        if j[schema.IMAGE_SHA256] != renders[j[schema.RENDER_KEY]][schema.IMAGE_SHA256]:
            raise ValueError(f"judge record {j[schema.REC_KEY]} judged another image than render record "
                             f"{j[schema.RENDER_KEY]} now holds (sha256 differs): judge again")
        if passes(j, rule, checked=True):
            good[j[schema.TWIN_ID]][j[schema.SIDE]].append(j[schema.RENDER_KEY])
    out = []
    for tid in sorted(good):
        combos = [(p, n) for p in sorted(set(good[tid][schema.POS_PREFIX]))
                  for n in sorted(set(good[tid][schema.NEG_PREFIX]))]
        if pairs_per_twin is not None and len(combos) > pairs_per_twin:
            rng = random.Random(seed_from_key(digest({"export-sample": tid, "seed": seed})))
            combos = rng.sample(combos, pairs_per_twin)
        for pos, neg in combos:
            pair_id = digest({"pair": {schema.TWIN_ID: tid, "pos": pos, "neg": neg}})
            out.append({schema.PAIR_ID: pair_id, schema.TWIN_ID: tid, "pos": pos, "neg": neg})
    return out


def pair_meta(row: Mapping, renders: Mapping[str, Mapping], by_twin: Mapping[str, Mapping]) -> dict:
    """The json of one exported pair: both captions, and the twin pair's fields that are known."""
    twin = by_twin[row[schema.TWIN_ID]]
    meta = {schema.POS_CAPTION: renders[row["pos"]][schema.CAPTION],
            schema.NEG_CAPTION: renders[row["neg"]][schema.CAPTION]}
    for name in (schema.POS_CONCEPT, schema.NEG_CONCEPT, schema.POS_COUNTRY, schema.NEG_COUNTRY, schema.CATEGORY,
                 schema.POS_CONTEXT, schema.NEG_CONTEXT, schema.POS_FEATURES, schema.NEG_FEATURES):
        if twin.get(name):  # absent, null or empty: left out of the json
            meta[name] = twin[name]
    meta[schema.PAIR_ID] = row[schema.PAIR_ID]
    return meta


def split_twins(twin_ids: Sequence[str], val_fraction: float, seed: int) -> set[str]:
    """The twin pairs of the validation split: those with :func:`~cultureclip.curate.runner.keys.in_val`."""
    return {t for t in twin_ids if in_val(t, seed, val_fraction)}


def _write_split(folder: Path, rows: list[dict], renders: Mapping, images: _Images, cfg: Mapping,
                 by_twin: Mapping) -> dict:
    writer = TwinShardWriter(folder, maxcount=cfg["maxcount"], resize=cfg["resize"])
    try:
        for row in sorted(rows, key=lambda r: r[schema.PAIR_ID]):
            writer.write(row[schema.PAIR_ID], images.path(renders[row["pos"]]), images.path(renders[row["neg"]]),
                         pair_meta(row, renders, by_twin))
    finally:
        sizes = writer.close()
    for path in folder.glob("shard-*.tar"):  # webdataset opens its first shard eagerly: drop it if empty
        if path.name not in sizes:
            path.unlink()
    return sizes


def _gallery(judged: list[dict], renders: Mapping, rule: Mapping, images: _Images, dest: Path, cfg: Mapping,
             by_twin: Mapping) -> list[dict]:
    """The rejected images with the lowest mean score first: thumbnail, scores and why."""
    rejected = [j for j in judged if not passes(j, rule)]
    rejected.sort(key=lambda j: (sum(j[s] for s in schema.SCORES), j[schema.REC_KEY]))
    out = []
    for j in rejected[:cfg["gallery_size"]]:
        rel = f"{C.CARD_ASSETS}/rejected/{j[schema.REC_KEY]}.jpg"
        C.thumbnail(images.path(renders[j[schema.RENDER_KEY]]), dest / rel, cfg["thumbnail_size"])
        twin = by_twin[j[schema.TWIN_ID]]
        other = schema.NEG_PREFIX if j[schema.SIDE] == schema.POS_PREFIX else schema.POS_PREFIX
        out.append({schema.REC_KEY: j[schema.REC_KEY], schema.RENDER_KEY: j[schema.RENDER_KEY], "thumbnail": rel,
                    schema.CONCEPT: twin[f"{j[schema.SIDE]}_{schema.CONCEPT}"],
                    schema.TWIN_CONCEPT: twin[f"{other}_{schema.CONCEPT}"], schema.SIDE: j[schema.SIDE],
                    schema.CAPTION: renders[j[schema.RENDER_KEY]][schema.CAPTION],
                    **{s: j[s] for s in schema.SCORES}, schema.TWIN_CHOICE: j[schema.TWIN_CHOICE],
                    "failures": rule_failures(j, rule), schema.REASON: j.get(schema.REASON, "")})
    return out


def run(cfg: Optional[Mapping], ctx) -> StageReport:
    """Export the judged renders of ``ctx.out_dir`` as twin shards with a dataset card.

    Args:
        cfg: the ``export`` settings (see ``DEFAULTS``): ``pairs_per_twin`` (null: all combinations),
            ``val_fraction``, ``split_seed`` (of the split rule), ``maxcount`` (pairs per shard),
            ``resize`` (shorter side, JPEG; null keeps the rendered PNG), ``rule`` (``min_score``, ``min_mean``, ``require_twin_check``),
            ``gallery_size``, ``thumbnail_size``, ``plots`` (the score histogram PNG; its numbers are
            in ``card.json`` either way).
        ctx: the run's :class:`~cultureclip.curate.registry.Context` (``num_shards`` must be 1).

    Raises:
        RuntimeError: render or judge has unfinished jobs. FileNotFoundError: a stage or an image is
        missing. ValueError: bad settings, or records that do not fit together.
    """
    start = time.monotonic()
    cfg = config(cfg)
    if ctx.num_shards != 1:
        raise ValueError(f"export runs as one process (num_shards=1, got {ctx.num_shards}); run it once every job "
                         f"range of render and judge has finished")
    out_dir = Path(ctx.out_dir)
    pairs = load_pairs(out_dir, NAME)
    source = pairs_store(out_dir)
    render_store, judge_store = Store(out_dir / RENDER, RENDER), Store(out_dir / JUDGE, JUDGE)
    render_store.require_complete(NAME, upstream=(source,))
    judge_store.require_complete(NAME, upstream=(render_store, source))
    by_twin = {p[schema.TWIN_ID]: p for p in pairs}
    # each store read once; of a render record only what export uses is kept (a million records fit)
    renders = {r[schema.REC_KEY]: {f: r.get(f) for f in RENDER_FIELDS} for r in render_store.records()}
    judged = sorted(({f: j.get(f) for f in JUDGE_FIELDS} for j in judge_store.records()),
                    key=lambda j: j[schema.REC_KEY])
    images = _Images(out_dir)
    rule = cfg["rule"]
    rows = build_pairs(pairs, renders, judged, rule, cfg["pairs_per_twin"], ctx.seed)
    twins = sorted({r[schema.TWIN_ID] for r in rows})
    val_twins = split_twins(twins, cfg["val_fraction"], cfg["split_seed"])
    stages = {store.stage: C.stage_summary(store) for store in C.stage_stores(out_dir, skip=(NAME,))}
    final = out_dir / NAME
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-partial-", dir=out_dir))
    old = None
    try:
        by_split = {TRAIN: [r for r in rows if r[schema.TWIN_ID] not in val_twins],
                    VAL: [r for r in rows if r[schema.TWIN_ID] in val_twins]}
        sizes = {split: _write_split(tmp / split, by_split[split], renders, images, cfg, by_twin)
                 for split in (TRAIN, VAL)}
        n_val = sum(sizes[VAL].values())
        report = StageReport(stage=NAME, job=job_id(0, 1), jobs_total=len(pairs), jobs_in_range=len(pairs),
                             processed=len(pairs), ok=len(twins),
                             extra={"train_pairs": len(rows) - n_val, "val_pairs": n_val, "train_twins":
                                    len(twins) - len(val_twins), "val_twins": len(val_twins)})
        hist = C.score_histograms(judged)
        n_pass = sum(passes(j, rule) for j in judged)
        card = {"export": {"twin_pairs": len(pairs), "twins_exported": len(twins), "train_pairs": len(rows) - n_val,
                           "val_pairs": n_val, "pairs_per_twin": cfg["pairs_per_twin"],
                           "val_fraction": cfg["val_fraction"], "seed": ctx.seed, "split_seed": cfg["split_seed"],
                           "sizes": sizes, "split_rule": SPLIT_RULE.format(f=cfg["val_fraction"],
                                                                           seed=cfg["split_seed"])},
                "rule": rule, "stages": stages,
                "judge": {"images_judged": len(judged), "images_passed": n_pass,
                          "pass_rate": C.rate(n_pass, len(judged)), "histograms": hist},
                "groups": C.group_tables(pairs, renders, judged, lambda j: passes(j, rule),
                                         (pair_meta(r, renders, by_twin) for r in rows)),
                "gallery": _gallery(judged, renders, rule, images, tmp, cfg, by_twin),
                "histogram_png": None,
                "sections": C.module_sections(out_dir, [name for name in stages if name != NAME],
                                              options={"judge": {"rule": rule}})}
        if judged and cfg["plots"]:
            card["histogram_png"] = f"{C.CARD_ASSETS}/scores.png"
            C.plot_histograms(hist, tmp / card["histogram_png"])
        C.write_card(tmp, card)
        if "hf" in cfg["formats"]:  # made from the shards and card just written
            report.extra["hf_rows"] = export_hf.write(tmp, rows, renders, judged, cfg["hf"], ctx, (TRAIN, VAL))
        report.seconds = round(time.monotonic() - start, 3)
        write_atomic(tmp / "reports" / f"{report.job}.json", json.dumps(asdict(report), indent=1))
        write_atomic(tmp / STAGE_FILE, json.dumps({"stage": NAME, "settings": cfg}, indent=1, sort_keys=True))
        if final.exists():  # the previous export is removed only once the new one is complete
            old = out_dir / f".{NAME}-old-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and final.exists():
            shutil.rmtree(old, ignore_errors=True)
    log.info("export: %d train and %d val pairs from %d of %d twin pairs in %s", len(rows) - n_val, n_val,
             len(twins), len(pairs), final)
    if not rows or (cfg["val_fraction"] > 0 and not n_val):
        log.warning("export: the %s split is empty (%d of %d twin pairs have a passing image on both sides); see "
                    "the rejected images in %s", "train" if not rows else "val", len(twins), len(pairs),
                    final / C.CARD_MD)
    return report
