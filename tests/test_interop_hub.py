"""The push_to_hub-ready folder (cultureclip.interop.hub, tools/push_to_hub.py): model files copied
unchanged, the card rendered from the run's own metrics.json (written by cultureclip.app)."""
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from cultureclip.app import write_run_outputs

REPO = Path(__file__).parents[1]
BEFORE = {"val/twin_acc": 0.5123, "val/i2t_r1": 0.25}
AFTER = {"val/twin_acc": 0.8765, "val/i2t_r1": 0.3125}
CONFIG = {"task_name": "toy", "seed": 3, "run_name": "toy-cultureclip-s3",
          "model": {"_target_": "cultureclip.model.build_encoder", "name": "ViT-B-32-quickgelu", "pretrained": "openai",
                    "lora": {"r": 4, "alpha": 16, "targets": "qv"}},
          "loss": {"_target_": "cultureclip.loss.CultureCLIPLoss", "variant": "cultureclip", "lambda_caption": 0.7,
                   "lambda_concept": 0.3},
          "optim": {"optimizer": {"lr": 1.0e-3}, "weight_decay": 0.05},
          "trainer": {"max_epochs": 6},
          "data": {"train_shards": "/data/toy/train", "batch_size": 64}}


@pytest.fixture
def run_dir(tmp_path, tiny_model):
    """A run directory as cultureclip.train leaves it (model/ + metrics.json), from the real writer."""
    trainer = SimpleNamespace(checkpoint_callbacks=[], global_step=180, is_global_zero=True, lightning_module=None)
    write_run_outputs(tmp_path / "run", tiny_model, trainer, OmegaConf.create(CONFIG), BEFORE, AFTER)
    return tmp_path / "run"


def load_tool():
    spec = importlib.util.spec_from_file_location("push_to_hub", REPO / "tools" / "push_to_hub.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_hub_folder_card_matches_metrics(run_dir, tmp_path, tiny_model):
    import torch
    from cultureclip import CultureCLIP
    tool = load_tool()
    assert tool.main([str(run_dir), "--out", str(tmp_path / "hub"), "--repo-id", "me/cc-tiny", "--tag", "toy"]) == 0
    out = tmp_path / "hub"
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):  # copied byte for byte
        assert (out / name).read_bytes() == (run_dir / "model" / name).read_bytes()
    loaded = CultureCLIP.from_pretrained(out)
    assert torch.equal(loaded.model.visual.proj, tiny_model.model.visual.proj)

    card = (out / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "open_clip" and front["license"] == "mit"
    assert {"clip", "open_clip", "loss-cultureclip", "toy"} <= set(front["tags"])
    assert front["base_model"] == "timm/vit_base_patch32_clip_224.openai"  # open_clip's hub repo of the tag
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in card.splitlines() if line.startswith("| ")}
    for k in BEFORE:
        b, a = metrics["before"][k], metrics["after"][k]
        assert rows[k] == [f"{b:.4f}", f"{a:.4f}", f"{a - b:+.4f}"]
    assert rows["loss.variant"] == ["cultureclip"] and rows["loss.lambda_concept"] == ["0.3"]
    assert rows["optim.optimizer.lr"] == ["0.001"] and rows["model.lora.r"] == ["4"]
    assert rows["data.batch_size"] == ["64"] and rows["seed"] == ["3"]
    assert "model._target_" not in rows
    assert f"Training steps: {metrics['global_step']}." in card
    assert "hf-hub:me/cc-tiny" in card


def test_hub_folder_errors(run_dir, tmp_path):
    tool = load_tool()
    (run_dir / "metrics.json").rename(run_dir / "m.json")
    assert tool.main([str(run_dir), "--out", str(tmp_path / "hub")]) == 1
    assert not (tmp_path / "hub" / "README.md").exists()
    with pytest.raises(SystemExit):  # --push without a repository is a usage error, before anything is written
        tool.main([str(run_dir), "--out", str(tmp_path / "hub"), "--push"])
