"""Tests for the evaluation entry point: ``conf/evaluate.yaml`` + ``conf/eval/*`` composed with Hydra and
``cultureclip.evaluate.evaluate`` run in-process on ``model=tiny``.

The twin task runs on the embedded toy validation split (built once per session); the cultural benchmarks,
ImageNet and COCO retrieval on tiny local fixtures in each one's real schema.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict
from PIL import Image

import cultureclip
from cultureclip.data.pipeline import build_twin_pipeline
from cultureclip.data.toy import ensure_toy_shards
from cultureclip.eval import aggregate, tasks
from cultureclip.eval.results import RESULT_KEYS
from cultureclip.eval.twins import embed_twin_split, twin_metrics
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
def root(tmp_path_factory):
    """A CULTURECLIP_HOME-like folder whose data/toy holds the toy set (built once, ~10 s)."""
    torch.set_num_threads(1)  # tiny model: intra-op threads only spin on a busy CPU
    root = tmp_path_factory.mktemp("home")
    ensure_toy_shards(root / "data" / "toy")
    return root


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
        assert Path(path).parent == out and HEADER <= set(record)
        assert record["model"] == "cultureclip-tiny" and record["pretrained"] is None
        assert all(isinstance(v, (int, float)) for v in record["metrics"].values()), key
        assert record["n"] > 0 and aggregate.load_result(path)["task"] == record["task"]
        tasks_seen.add(record["task"])
    assert {"twins", "crope", "cultureverse_recognition", "imagenet_zeroshot", "coco_retrieval"} <= tasks_seen


def test_twin_acc_equals_twin_metrics_computed_directly(run, root):
    cfg, paths, objects, _ = run
    record = json.loads(Path(paths["twins"]).read_text())
    model = objects["model"]
    urls = sorted(str(p) for p in (root / "data" / "toy" / "val").glob("*.tar"))
    assert record["extra"]["shards"] == urls and record["split"] == "val" and record["n"] == 768
    pipeline = build_twin_pipeline(urls, model.preprocess_val, model.tokenizer, 64, train=False)
    emb = embed_twin_split(model, pipeline, concept_context_length=16 if model.supports_short_context else None)
    direct = twin_metrics(emb)
    assert record["metrics"]["twin_acc"] == direct["twin_acc"]
    assert record["metrics"]["img2concept_recall@5"] == pytest.approx(direct["img2concept_recall@5"])
    assert len(record["extra"]["predictions"]) == record["n"]


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
