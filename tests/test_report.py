"""Tests for cultureclip.eval.report (plots and report.md) and cultureclip.eval.aggregate (+ its CLI).

Twin results come from the real ``twins`` task on a few hand-written PNG pairs and a tiny random model,
so the gallery can be checked pixel for pixel against the images that went into the shards.
"""
import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VIT
from matplotlib.figure import Figure
from PIL import Image

from cultureclip import CultureCLIP, schema
from cultureclip.data.shards import TwinShardWriter
from cultureclip.eval import aggregate, report, tasks
from cultureclip.eval.results import write_result

ROOT = Path(__file__).resolve().parent.parent
# (pos concept, pos country, neg concept, neg country, category)
PAIRS = [("qipao", "China", "ao dai", "Vietnam", "Clothing"), ("kimono", "Japan", "hanbok", "Korea", "Clothing"),
         ("pagoda", "China", "stepped pyramid", "Mexico", "Architecture")]


def png_bytes(seed, size=40):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_twin_shards(folder, variants=2):
    """Two shards of ``len(PAIRS) * variants`` pairs; returns ``{(key, role): png bytes}``."""
    images = {}
    with TwinShardWriter(folder, maxcount=4) as w:
        for v in range(variants):
            for p, (pos, pc, neg, nc, cat) in enumerate(PAIRS):
                key = f"pair{p}v{v}"
                images[(key, "pos")], images[(key, "neg")] = png_bytes(10 * p + v), png_bytes(10 * p + v + 500)
                w.write(key, images[(key, "pos")], images[(key, "neg")],
                        {schema.POS_CAPTION: f"a {pos} photo", schema.NEG_CAPTION: f"a {neg} photo",
                         schema.POS_CONCEPT: pos, schema.NEG_CONCEPT: neg, schema.POS_COUNTRY: pc,
                         schema.NEG_COUNTRY: nc, schema.CATEGORY: cat, schema.PAIR_ID: f"p{p}"})
    return images


@pytest.fixture(scope="module")
def twin_setup(tmp_path_factory):
    """``(result dict as loaded from JSON, {(key, role): png bytes}, shard folder)``."""
    torch.set_num_threads(1)  # tiny model: intra-op threads only spin on a busy CPU
    folder = tmp_path_factory.mktemp("shards") / "val"
    images = write_twin_shards(folder)
    torch.manual_seed(0)
    model = CultureCLIP.from_config(TINY_VIT, name="tiny-vit").eval()
    metrics, header, extra = tasks.twins(model, str(folder), batch_size=4, concept_context_length=None)
    path = write_result(folder.parent / "results", model="tiny-vit", pretrained=None, metrics=metrics, extra=extra,
                        **header)
    return aggregate.load_result(path), images, folder


def test_twins_task_header_and_extra(twin_setup):
    result, images, folder = twin_setup
    assert result["task"] == "twins" and result["split"] == "val" and result["n"] == len(images)
    assert result["extra"]["shards"] == sorted(str(p) for p in folder.glob("*.tar"))
    assert len(result["extra"]["predictions"]) == len(images)
    assert all(not isinstance(v, (dict, list)) for v in result["metrics"].values())


def test_group_scores_and_bars_are_sorted_with_counts(twin_setup):
    result, _, _ = twin_setup
    scores = report.group_scores(result, "country")
    assert {v for v, _, _ in scores} == {"China", "Vietnam", "Japan", "Korea", "Mexico"}
    assert [s for _, s, _ in scores] == sorted((s for _, s, _ in scores), reverse=True)
    assert dict((v, n) for v, _, n in scores)["China"] == 4  # 2 pairs x 2 variants, pos side only
    assert report.groups(result) == ["category", "country"]
    fig = report.plot_group_bars(result, result, group="country", labels=("a", "b"))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [v for v, _, _ in scores][::-1]  # best on top
    labels = [t.get_text() for t in ax.texts]
    assert "n=4" in labels and len(ax.patches) == 2 * len(scores)


def test_confusion_matrix_counts_predictions(twin_setup):
    result, _, _ = twin_setup
    preds = result["extra"]["predictions"]
    pairs = report.most_confused_pairs(result, top_pairs=2)
    assert len(pairs) == 2 and all(len(p) == 2 for p in pairs)
    concepts = [c for pair in pairs for c in pair]
    matrix = report.twin_confusion_matrix(result, concepts)
    for i, c in enumerate(concepts):
        own = [p for p in preds if p["concept"] == c]
        assert sum(matrix[i]) == pytest.approx(1.0)
        for j, d in enumerate(concepts):
            assert matrix[i][j] == pytest.approx(sum(p["predicted"] == d for p in own) / len(own))
    assert isinstance(report.plot_twin_confusion(result, result), Figure)


def test_gallery_fetches_the_exact_images_by_key(twin_setup):
    result, images, _ = twin_setup
    worst = report.worst_confusions(result, n=4)
    assert all(not p["twin_correct"] for p in worst)
    firsts = [p["concept"] for p in worst][:len({p["concept"] for p in worst})]
    assert len(set(firsts)) == len(firsts)  # one image per concept before any concept repeats
    wanted = [(p["key"], p["role"]) for p in result["extra"]["predictions"][:5]]
    fetched = report.fetch_images(result["extra"]["shards"], wanted)
    assert set(fetched) == set(wanted)
    for k in wanted:
        assert np.array_equal(np.asarray(fetched[k]), np.asarray(Image.open(io.BytesIO(images[k])).convert("RGB")))
    fig = report.plot_gallery(result, result, n=3)
    assert isinstance(fig, Figure) and len(fig.axes) == 6


def test_write_report_and_missing_shards(twin_setup, tmp_path):
    result, _, _ = twin_setup
    bench = {**result, "task": "crope", "extra": {}, "path": str(tmp_path / "crope.json"),
             "metrics": {"acc": 0.5, "n": 4, "acc/role=main": 0.25, "n/role=main": 2, "acc/role=definition": 0.75,
                         "n/role=definition": 2}}
    path = report.write_report(tmp_path, [result, bench])
    text = path.read_text()
    for png in ("summary.png", f"{Path(result['path']).stem}_country.png", f"{Path(result['path']).stem}_gallery.png",
                "crope_role.png"):
        assert (tmp_path / png).stat().st_size > 0 and f"]({png})" in text
    assert "| twin_acc |" in text and "### acc per role" in text
    moved = {**result, "extra": {**result["extra"], "shards": [str(tmp_path / "gone.tar")]}}
    (tmp_path / "moved").mkdir()
    assert "gallery not drawn" in report.write_report(tmp_path / "moved", [moved]).read_text()


def test_compare_markdown_has_deltas(twin_setup):
    result, _, _ = twin_setup
    better = {**result, "metrics": {**result["metrics"], "twin_acc": result["metrics"]["twin_acc"] + 0.25}}
    text = report.compare_markdown([result], [better], ("base", "tuned"))
    row = next(line for line in text.splitlines() if "| twin_acc |" in line)
    assert row.rstrip(" |").endswith("0.2500")


# ---------------------------------------------------------------- aggregate
def fake_result(folder, model, task, metrics, pretrained=None):
    return write_result(folder, model=model, pretrained=pretrained, task=task, dataset="d", split="test",
                        revision=None, seed=0, n=metrics.get("n", 3), metrics=metrics)


def test_aggregate_mixed_tasks_union_of_columns(tmp_path):
    fake_result(tmp_path / "a", "m1", "twins", {"twin_acc": 0.5, "twin_acc/country=Japan": 1.0})
    fake_result(tmp_path / "a", "m1", "crope", {"acc": 0.75, "n": 8})
    fake_result(tmp_path / "b", "m2", "twins", {"twin_acc": 0.625}, pretrained="openai")
    results, skipped = aggregate.load_results([tmp_path / "a", tmp_path / "b"])
    assert len(results) == 3 and not skipped
    out = aggregate.write_csv(results, tmp_path / "out.csv")
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0])[:8] == list(aggregate.HEADER_COLUMNS)
    by = {(r["model"], r["task"]): r for r in rows}
    assert by[("m1", "crope")]["acc"] == "0.75" and by[("m1", "crope")]["twin_acc"] == ""
    assert by[("m1", "crope")]["metric.n"] == "8" and by[("m1", "crope")]["n"] == "8"  # metric n kept apart
    assert by[("m2", "twins")]["pretrained"] == "openai" and by[("m2", "twins")]["twin_acc/country=Japan"] == ""
    md = aggregate.to_markdown(results)
    assert "twin_acc/country=Japan" not in md and "| m2 | openai | twins |" in md


def test_aggregate_bad_files(tmp_path):
    fake_result(tmp_path, "m1", "twins", {"twin_acc": 0.5})
    (tmp_path / "notes.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"model": "m", "metrics": {}}))
    with pytest.raises(aggregate.ResultFileError, match="notes.json"):
        aggregate.load_results(tmp_path)
    results, skipped = aggregate.load_results(tmp_path, skip_bad=True)
    assert len(results) == 1 and len(skipped) == 2
    assert any("other.json" in s and "missing header keys" in s for s in skipped)


def test_aggregate_duplicates_name_both_files(tmp_path):
    a = fake_result(tmp_path / "a", "m1", "twins", {"twin_acc": 0.5})
    b = fake_result(tmp_path / "b", "m1", "twins", {"twin_acc": 0.6})
    with pytest.raises(aggregate.ResultFileError, match="duplicate") as err:
        aggregate.load_results([tmp_path / "a", tmp_path / "b"])
    assert str(a) in str(err.value) and str(b) in str(err.value)


def test_aggregate_cli(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("aggregate_results", ROOT / "tools" / "aggregate_results.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    fake_result(tmp_path / "r", "m1", "twins", {"twin_acc": 0.5})
    (tmp_path / "r" / "junk.json").write_text("[]")
    assert cli.main([str(tmp_path / "r"), "--out", str(tmp_path / "x.csv")]) == 1
    assert "junk.json" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "r"), "--out", str(tmp_path / "x.csv"), "--md", str(tmp_path / "x.md"),
                     "--skip-bad"]) == 0
    assert "1 file(s) skipped" in capsys.readouterr().out
    assert (tmp_path / "x.csv").read_text().count("\n") == 2 and "| m1 |" in (tmp_path / "x.md").read_text()
