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


def recording_api_class(calls: list):
    """huggingface_hub's HfApi with its network calls (create the repo, check the card's YAML, upload)
    recorded instead of sent; the library's own selection of the files to upload (allow_patterns) runs."""
    from huggingface_hub import HfApi

    class RecordingApi(HfApi):
        def __init__(self, *args, **kwargs):
            super().__init__(token="hf_test_not_a_token")

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def _validate_yaml(self, content, **kw):
            yaml.safe_load(content.split("---")[1])  # what the Hub checks: the front matter parses

        def upload_folder(self, *, folder_path, repo_id, repo_type=None, allow_patterns=None, **kw):
            # the library's own selection of the files to add (and its card check), then no network
            ops = self._prepare_upload_folder_additions(folder_path, "", allow_patterns=allow_patterns,
                                                        repo_type=repo_type)
            calls.append(("upload_folder", repo_id, sorted(op.path_in_repo for op in ops), repo_type))
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")
    return RecordingApi


@pytest.fixture
def recording_hub(monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls: list = []
    monkeypatch.setattr(hub, "HfApi", recording_api_class(calls))
    return calls


def test_model_push_is_private_by_default_and_uploads_only_its_files(run_dir, tmp_path, recording_hub, capsys):
    out = tmp_path / "hub"
    out.mkdir()
    (out / "notes.txt").write_text("my private notes")  # a non-empty --out: left alone, not uploaded
    (out / "secrets").mkdir()
    (out / "secrets" / "token").write_text("hf_abc")
    tool = load_tool()
    assert tool.main([str(run_dir), "--out", str(out), "--repo-id", "me/cc", "--push"]) == 0
    (_, repo, kw), (_, _, uploaded, repo_type) = recording_hub
    assert repo == "me/cc" and kw["private"] is True and repo_type == "model"
    assert uploaded == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    assert "not uploading 2 other entries" in capsys.readouterr().out
    recording_hub.clear()
    assert tool.main([str(run_dir), "--out", str(out), "--repo-id", "me/cc", "--push", "--public"]) == 0
    assert recording_hub[0][2]["private"] is False


def test_dataset_push_uploads_only_the_dataset_files_privately(tmp_path, recording_hub):
    spec = importlib.util.spec_from_file_location("push_dataset", REPO / "tools" / "push_dataset.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = tmp_path / "hf"
    assert tool.main([str(folder), "--repo-id", "me/twins", "--push"]) == 1  # not a dataset folder: refused
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: other\n---\n")
    (folder / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1")
    (folder / "data" / "notes.md").write_text("not the dataset")
    (folder / "card").mkdir()
    (folder / "card" / "scores.png").write_bytes(b"png")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.arrow").write_bytes(b"cache")
    assert tool.main([str(folder), "--repo-id", "me/twins"]) == 0 and recording_hub == []  # no --push: nothing
    assert tool.main([str(folder), "--repo-id", "me/twins", "--push"]) == 0
    (_, repo, kw), (_, _, uploaded, repo_type) = recording_hub
    assert kw["private"] is True and kw["repo_type"] == "dataset" and repo_type == "dataset"
    assert uploaded == ["README.md", "card/scores.png", "data/train-00000-of-00001.parquet"]
