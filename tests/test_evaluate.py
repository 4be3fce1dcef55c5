"""Tests for the evaluation entry point: ``conf/evaluate.yaml`` + ``conf/eval/*`` composed with Hydra and
``cultureclip.evaluate.evaluate`` run in-process on ``model=tiny``.

The twin task runs on the embedded toy validation split (conftest's session ``toy_shards``); the cultural
benchmarks, ImageNet and COCO retrieval on tiny local fixtures in each one's real schema.
"""
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

import cultureclip
from cultureclip import schema
from cultureclip.eval import aggregate, tasks
from cultureclip.eval.results import RESULT_KEYS, write_result
from cultureclip.evaluate import evaluate

CONF = Path(cultureclip.__file__).parent / "conf"
HEADER = {*RESULT_KEYS, "versions", "metrics"}


def compose_cfg(root, overrides=(), results_dir=None):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        if results_dir is not None:
            cfg.results_dir = str(results_dir)
    return cfg


def save_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path.name


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def benchmark_fixtures(d):
    """Local copies of the four cultural benchmarks + an ImageNet folder + a retrieval CSV; returns overrides."""
    regions = ["japan", "peru", "kenya", "india", "france"]
    retrieval = [{"image": "img/r%d.png" % i, "region": r, "universal": "drinks"} for i, r in enumerate(regions)]
    grounding = [{"image": "img/g%d.png" % i, "region": "japan", "concept": c}
                 for i, c in enumerate(["kimono", "sushi", "torii", "geta", "bento"])]
    for row, seed in zip(retrieval + grounding, range(100)):
        save_png(d / row["image"], seed)
    crope = [{"image": "img/c0.png", "definition_images": ["img/c1.png"], "answer": "no",
              "metadata": {"image_en_concept": "hanbok", "definition_concept": "kimono"}},
             {"image": "img/c2.png", "definition_images": [], "answer": "yes",
              "metadata": {"image_en_concept": "sari", "definition_concept": "lehenga"}}]
    for i in range(3):
        save_png(d / f"img/c{i}.png", 200 + i)
    verse = [{"image": f"img/v{i}.png", "question_type": qt, "options": ["Jollof rice", "Fufu", "Injera"],
              "answer": "B", "country": country, "topic": "food"}
             for i, (qt, country) in enumerate([("Image Recognition", "Nigeria"), ("image_recognition", "Ghana"),
                                                ("Cultural Knowledge", "Ghana")])]
    for i in range(3):
        save_png(d / f"img/v{i}.png", 300 + i)
    for i, name in enumerate(["tench", "goldfish"]):
        for j in range(2):
            save_png(d / "imagenet" / name / f"{j}.png", 400 + 2 * i + j)
    (d / "classes.txt").write_text("tench\ngoldfish\n")
    (d / "templates.txt").write_text("a photo of a {c}.\n")
    coco = "image,caption\n" + "".join(f"coco/{i}.png,a photo number {i}\ncoco/{i}.png,picture {i}\n" for i in range(3))
    for i in range(3):
        save_png(d / f"coco/{i}.png", 500 + i)
    (d / "coco.csv").write_text(coco)
    t = "eval.tasks"
    return [f"{t}.globalrg_retrieval.source={write_jsonl(d / 'retrieval.jsonl', retrieval)}",
            f"{t}.globalrg_grounding.source={write_jsonl(d / 'grounding.jsonl', grounding)}",
            f"{t}.crope.source={write_jsonl(d / 'crope.jsonl', crope)}",
            f"{t}.cultureverse.source={write_jsonl(d / 'verse.jsonl', verse)}",
            f"{t}.imagenet.folder={d / 'imagenet'}", f"{t}.imagenet.classnames_path={d / 'classes.txt'}",
            f"{t}.imagenet.templates_path={d / 'templates.txt'}",
            f"{t}.coco_retrieval.captions_file={d / 'coco.csv'}", f"{t}.coco_retrieval.image_root={d}",
            f"{t}.coco_retrieval.split=null"] + \
        [f"{t}.{k}.num_workers=0" for k in ("twins", "globalrg_retrieval", "globalrg_grounding", "crope",
                                            "cultureverse", "imagenet", "coco_retrieval")]


@pytest.fixture(scope="session")
def root(toy_shards):
    """A CULTURECLIP_HOME-like folder whose data/toy holds the toy set."""
    return toy_shards.parents[1]


@pytest.fixture(scope="module")
def run(root, tmp_path_factory):
    """One evaluation of model=tiny on every task: ``(cfg, {task key: path}, objects, results_dir)``."""
    fixtures = tmp_path_factory.mktemp("bench")
    out = tmp_path_factory.mktemp("results")
    cfg = compose_cfg(root, ["eval=[twins,cultural,imagenet,coco_retrieval]", "device=cpu",
                             *benchmark_fixtures(fixtures)], results_dir=out)
    paths, objects = evaluate(cfg)
    return cfg, paths, objects, out


def test_one_result_per_task_with_header_and_flat_metrics(run):
    _, paths, _, out = run
    assert set(paths) == {"twins", "globalrg_retrieval", "globalrg_grounding", "crope", "cultureverse", "imagenet",
                          "coco_retrieval"}
    tasks_seen = set()
    for key, path in paths.items():
        record = json.loads(Path(path).read_text())
        assert Path(path).parent == out and HEADER <= set(record) and "None" not in Path(path).name
        assert record["model"] == "cultureclip-tiny" and record["pretrained"] is None
        assert all(isinstance(v, (int, float)) for v in record["metrics"].values()), key
        assert record["n"] > 0 and aggregate.load_result(path)["task"] == record["task"]
        tasks_seen.add(record["task"])
    assert {"twins", "crope", "cultureverse_recognition", "imagenet_zeroshot", "coco_retrieval"} <= tasks_seen


def _read_pairs(urls):
    """Every pair of the shards, read with tarfile and PIL (not the project's pipeline): (pil_pos, pil_neg, meta)."""
    pairs = []
    for url in urls:
        members = defaultdict(dict)
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members[key][ext] = tar.extractfile(m).read()
        for key in sorted(members):
            raw = members[key]
            pos, neg = (Image.open(io.BytesIO(raw[next(x for x in exts if x in raw)])).convert("RGB")
                        for exts in (schema.POS_IMAGE_MEMBERS, schema.NEG_IMAGE_MEMBERS))
            pairs.append((pos, neg, json.loads(raw[schema.META])))
    return pairs


@torch.no_grad()
def test_twin_metrics_match_a_brute_force_reference(run, root):
    """twin_acc, twin_caption_acc and concept recall@1/@5 recomputed from raw features, by plain matmuls."""
    _, paths, objects, _ = run
    record = json.loads(Path(paths["twins"]).read_text())
    model = objects["model"].eval()
    urls = sorted(str(p) for p in (root / "data" / "toy" / "val").glob("*.tar"))
    assert record["extra"]["shards"] == urls and record["split"] == "val" and record["n"] == 768
    assert len(record["extra"]["predictions"]) == record["n"]
    pairs = _read_pairs(urls)
    images = [im for pos, neg, _ in pairs for im in (pos, neg)]  # row 2p: pos of pair p, 2p + 1: its neg
    own = [m[k] for _, _, m in pairs for k in (schema.POS_CONCEPT, schema.NEG_CONCEPT)]
    twin = [m[k] for _, _, m in pairs for k in (schema.NEG_CONCEPT, schema.POS_CONCEPT)]
    captions = [m[k] for _, _, m in pairs for k in (schema.POS_CAPTION, schema.NEG_CAPTION)]
    img = torch.cat([model.encode_image(torch.stack([model.preprocess_val(im) for im in images[i:i + 128]]))
                     for i in range(0, len(images), 128)])  # [2P, D]
    vocab = sorted(set(own))
    names, caps = model.encode_text(vocab), model.encode_text(captions)  # [C, D], [2P, D]
    sim = img @ names.T  # [2P, C]
    own_i, twin_i = torch.tensor([vocab.index(c) for c in own]), torch.tensor([vocab.index(c) for c in twin])
    rows = torch.arange(len(images))
    margin = sim[rows, own_i] - sim[rows, twin_i]
    cap_sim = (img * caps).sum(1), (img * caps[rows ^ 1]).sum(1)
    rank = (sim > sim[rows, own_i].unsqueeze(1)).sum(1) + 1  # 1 + concepts scoring strictly higher
    n = len(images)
    # counts over n, not float32 means; the pipeline batches differently, so a score may move in the last
    # float bits: allow the near-ties
    near = int((margin.abs() < 1e-5).sum())
    m = record["metrics"]
    assert abs(m["twin_acc"] - int((margin > 0).sum()) / n) <= near / n
    assert m["twin_caption_acc"] == pytest.approx(int((cap_sim[0] > cap_sim[1]).sum()) / n, abs=2 / n)
    for k in (1, 5):
        assert m[f"img2concept_recall@{k}"] == pytest.approx(int((rank <= k).sum()) / n, abs=2 / n), k
    assert m["n_concepts"] == len(vocab) and m["n_pairs"] == len(pairs)


def test_result_file_names_carry_no_none(tmp_path):
    common = dict(task="twins", dataset="d", split="val", revision=None, seed=None, n=1, metrics={"a": 1.0})
    assert write_result(tmp_path, model="out/run/model", pretrained=None, **common).name == "out_run_model__twins.json"
    named = write_result(tmp_path, model="ViT-B-32", pretrained="openai", **common)
    assert named.name == "ViT-B-32__openai__twins.json"


def test_report_and_plots_written(run):
    _, paths, _, out = run
    text = (out / "report.md").read_text()
    stem = Path(paths["twins"]).stem
    for png in ["summary.png", f"{stem}_country.png", f"{stem}_category.png", f"{stem}_confusion.png",
                f"{stem}_gallery.png", f"{Path(paths['cultureverse']).stem}_country.png"]:
        assert (out / png).is_file() and f"]({png})" in text
    assert "## imagenet_zeroshot" in text and "## coco_retrieval" in text


def test_saved_model_dir_as_model_name(run, root, tmp_path):
    _, paths, objects, _ = run
    saved = objects["model"].save_pretrained(tmp_path / "run" / "model")
    cfg = compose_cfg(root, ["eval=crope", "device=cpu", f"model.name={saved}", "eval.tasks.crope.num_workers=0",
                             f"eval.tasks.crope.source={json.loads(Path(paths['crope']).read_text())['dataset']}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "outputs")
    new_paths, _ = evaluate(cfg)
    assert Path(new_paths["crope"]).parent == tmp_path / "outputs" / "eval" / "run_model"  # default results_dir
    record, first = (json.loads(Path(p).read_text()) for p in (new_paths["crope"], paths["crope"]))
    assert record["model"] == str(saved) and record["pretrained"] is None
    assert record["metrics"] == first["metrics"]  # the saved weights score exactly as the in-memory model


def test_no_tasks_is_an_error(root):
    with pytest.raises(ValueError, match="no evaluation tasks"):
        evaluate(compose_cfg(root, ["eval.tasks.twins=null"]))  # every task dropped


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "eval").glob("*.yaml")))
def test_every_eval_config_composes(name, tmp_path):
    cfg = compose_cfg(tmp_path, [f"eval={name}", "model=vit_b32_openai"])
    assert cfg.model.lora is None  # evaluation never adds adapters
    assert tasks.model_slug(cfg.model.name, cfg.model.pretrained) == cfg.model_slug
    for key, task in (cfg.eval.get("tasks") or {}).items():
        assert task._partial_ is True and task._target_.startswith("cultureclip.eval.tasks."), key
        OmegaConf.to_container(task, resolve=True, throw_on_missing=False)  # interpolations resolve
        module, func = task._target_.rsplit(".", 1)
        assert module == tasks.__name__ and callable(getattr(tasks, func)), task._target_


@pytest.mark.parametrize("name, pretrained, slug", [
    ("ViT-B-32-quickgelu", "openai", "ViT-B-32-quickgelu_openai"), ("hf-hub:org/repo", None, "org_repo"),
    ("outputs/toy-cultureclip-s0/model", None, "toy-cultureclip-s0_model"),
    ("outputs/run/checkpoints/last.ckpt", "openai", "run_last"), ("cultureclip-tiny", None, "cultureclip-tiny")])
def test_model_slug(name, pretrained, slug):
    assert tasks.model_slug(name, pretrained) == slug


def twin_split(folder, n_good, n_bad):
    """One shard of ``n_good`` valid pairs (if any) and one of ``n_bad`` pairs with an undecodable image."""
    import webdataset as wds

    from cultureclip import schema
    from cultureclip.data.shards import TwinShardWriter
    folder.mkdir(parents=True)
    meta = {schema.POS_CAPTION: "a qipao", schema.NEG_CAPTION: "an ao dai", schema.POS_CONCEPT: "qipao",
            schema.NEG_CONCEPT: "ao dai"}
    if n_good:
        with TwinShardWriter(folder / "good", maxcount=100) as w:
            for i in range(n_good):
                w.write(f"good{i}", Image.new("RGB", (32, 32), (i, 0, 0)), Image.new("RGB", (32, 32), (0, i, 0)), meta)
        (folder / "good" / "shard-000000.tar").rename(folder / "shard-000000.tar")
    with wds.TarWriter(str(folder / "shard-000001.tar")) as w:
        for i in range(n_bad):
            w.write({schema.KEY: f"bad{i}", "pos.jpg": b"broken", "neg.jpg": b"broken",
                     "json": json.dumps(meta).encode()})
    return folder


def test_skip_count_survives_a_worker_without_pairs(root, tmp_path):
    split = twin_split(tmp_path / "mixed", n_good=3, n_bad=4)
    cfg = compose_cfg(root, ["eval=twins", "device=cpu", f"eval.tasks.twins.shards={split}", "report=false",
                             "eval.tasks.twins.num_workers=2"], results_dir=tmp_path / "out")
    paths, _ = evaluate(cfg)  # worker 1 reads only the bad shard: its count comes in a skip report
    record = json.loads(Path(paths["twins"]).read_text())
    assert record["metrics"]["n_skipped"] == 4 and record["n"] == 6


@pytest.mark.slow  # one CLI run
def test_cli_empty_twin_split_is_an_error_with_the_true_skip_count(root, tmp_path):
    import subprocess
    import sys
    split = twin_split(tmp_path / "allbad", n_good=0, n_bad=5)
    cmd = [sys.executable, "-m", "cultureclip.evaluate", "eval=twins", "device=cpu", "report=false",
           f"eval.tasks.twins.shards={split}", "eval.tasks.twins.num_workers=0", f"paths.root_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(cultureclip.__file__).parents[1])
    assert proc.returncode != 0
    assert "twin split 'allbad'" in proc.stderr and "5 samples were skipped" in proc.stderr, proc.stderr[-2000:]
