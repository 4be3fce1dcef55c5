"""``python -m cultureclip.evaluate eval=wiseft``: the sweep's end points reproduce the two models evaluated
directly (exactly), and the table (CSV, markdown, JSON) and the plot are written."""
import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from PIL import Image

import cultureclip
from cultureclip import resolvers
from cultureclip.eval import wiseft
from cultureclip.evaluate import evaluate

CONF = Path(cultureclip.__file__).parent / "conf"


def compose_cfg(root, overrides, results_dir):
    resolvers.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(root)
        cfg.results_dir = str(results_dir)
    return cfg


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory):
    """The base of ``model=tiny`` (seed 0, as the command builds it) with every weight moved: a "fine-tune"."""
    torch.manual_seed(0)
    model = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * (p.abs().mean() + 1e-3) * torch.randn(p.shape, generator=g))
    return model.save_pretrained(tmp_path_factory.mktemp("ft") / "model")


@pytest.mark.slow  # five evaluations of a twin shard through the command (~15 s on an idle CPU)
def test_wiseft_end_points_equal_the_two_models_and_files_are_written(toy_shards, finetuned_dir, tmp_path):
    root = toy_shards.parents[1]
    shard = [f"eval.tasks.twins.shards={toy_shards}/val/shard-000000.tar"]
    cfg = compose_cfg(root, ["eval=wiseft", f"eval.wiseft.finetuned={finetuned_dir}", "eval.wiseft.alphas=[0,0.5,1]",
                             *shard], tmp_path / "sweep")
    paths, _ = evaluate(cfg)
    out = Path(cfg.eval.wiseft.out_dir)
    assert out.parent == tmp_path / "sweep" and {p.name for p in paths.values()} == {
        "wiseft.csv", "wiseft.md", "wiseft.json", "wiseft.png"}
    rows = json.loads((out / "wiseft.json").read_text())["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    # the two models evaluated directly by the plain command
    direct = {}
    for name, model_override in (("base", []), ("finetuned", [f"model.name={finetuned_dir}"])):
        evaluate(compose_cfg(root, ["eval=twins", *model_override, *shard], tmp_path / name))
        result = json.loads(next((tmp_path / name).glob("*twins.json")).read_text())
        direct[name] = {f"twins/{k}": float(v) for k, v in result["metrics"].items()}
    for row, name in ((rows[0], "base"), (rows[2], "finetuned")):
        assert {k: v for k, v in row.items() if k != "alpha"} == direct[name], name  # exactly
    assert direct["base"] != direct["finetuned"]  # the end points are two different models
    # the table files agree with the rows
    with open(out / "wiseft.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(r["twins/twin_acc"]) for r in table] == [r["twins/twin_acc"] for r in rows]
    md = (out / "wiseft.md").read_text().splitlines()
    assert md[0].startswith("| alpha | twins/") and len(md) == 2 + 3 and "twin_acc/" not in md[0]
    assert md[2].startswith("| 0 | ") and md[4].startswith("| 1 | ")
    with Image.open(out / "wiseft.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_wiseft_refuses_unknown_tasks_and_columns(tiny_model, tmp_path):
    def fake(model):
        return {"acc": 1.0, "n": 3}, {}, {}
    with pytest.raises(KeyError, match=r"eval.wiseft.tasks names \['nope'\]"):
        wiseft.run_wiseft(tiny_model, tiny_model, {"t": fake}, [0, 1], tmp_path, only=["nope"])
    with pytest.raises(KeyError, match="did not return: \\['t/missing'\\]"):
        wiseft.run_wiseft(tiny_model, tiny_model, {"t": fake}, [0, 1], tmp_path, columns=["t/missing"])
    paths = wiseft.run_wiseft(tiny_model, tiny_model, {"t": fake}, [0, 1], tmp_path)
    assert paths["md"].read_text().splitlines()[0] == "| alpha | t/acc |"  # counts left out of the summary


def test_wiseft_end_points_are_exact_with_a_cheap_task(tiny_model, tmp_path):
    tiny_model.eval()  # as the command builds its models (attention takes another kernel in training mode)
    # the library path of the command, with a task that scores fixed inputs: the end points equal the
    # two models scored directly, bit for bit, and the middle differs from both
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    tokens = tiny_model.tokenize(["a red star", "a blue ring", "a kimono", "a hanbok"])

    def score(model):
        with torch.no_grad():
            sims = model.encode_image(pixels) @ model.encode_text(tokens).T  # [4, 4]
        return {f"sim{i}{j}": float(sims[i, j]) for i in range(4) for j in range(4)}, {}, {}

    finetuned = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    paths = wiseft.run_wiseft(tiny_model, finetuned, {"s": score}, [0, 0.5, 1], tmp_path, y_metric="s/sim00")
    rows = json.loads(paths["json"].read_text())["rows"]
    for row, model in ((rows[0], tiny_model), (rows[2], finetuned)):
        assert {k: v for k, v in row.items() if k != "alpha"} == {f"s/{k}": v for k, v in score(model)[0].items()}
    assert rows[1]["s/sim00"] not in (rows[0]["s/sim00"], rows[2]["s/sim00"])
    assert paths["plot"].is_file() and paths["csv"].is_file() and paths["md"].is_file()
