"""CultureCLIP encoder: normalised features, short concept context, save -> plain open_clip load,
refusal of mismatched architectures, no unpickling."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cultureclip import CultureCLIP
from cultureclip.model import CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError, UnsafeCheckpointError
from conftest import TINY_VIT, randomize_lora

TEXTS = ["a cheongsam at a tea house", "a kimono at a shrine festival"]


def test_encoders_are_normalised_and_match_open_clip(tiny_model):
    tiny_model.eval()
    x = torch.randn(2, 3, 32, 32)
    img = tiny_model.encode_image(x)
    txt = tiny_model.encode_text(TEXTS)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    # same as open_clip's own encoders with normalize=True
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS, context_length=24)
    torch.testing.assert_close(txt, F.normalize(tiny_model.model.encode_text(tokens), dim=-1))
    torch.testing.assert_close(tiny_model.encode_text(tokens), txt)
    torch.testing.assert_close(img, F.normalize(tiny_model.model.encode_image(x), dim=-1))


def test_short_context_gives_identical_features(tiny_model):
    tiny_model.eval()
    names = ["qipao", "hanbok", "ao dai"]
    full = tiny_model.encode_text(tiny_model.tokenize(names))
    short = tiny_model.encode_text(tiny_model.tokenize(names, context_length=8))
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="context length"):
        tiny_model.encode_text(torch.zeros(1, 30, dtype=torch.long))


def test_save_pretrained_loads_in_plain_open_clip(tiny_model, tmp_path):
    tiny_model.add_lora(r=4)
    randomize_lora(tiny_model)
    tiny_model.eval()
    x = torch.randn(2, 3, 32, 32)
    img, txt = tiny_model.encode_image(x), tiny_model.encode_text(TEXTS)
    tiny_model.save_pretrained(tmp_path / "out")
    assert tiny_model.has_lora  # saving merges a copy, the live model keeps its adapters
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "out"))
    model.eval()
    tok = open_clip.get_tokenizer("local-dir:" + str(tmp_path / "out"))
    torch.testing.assert_close(F.normalize(model.encode_image(x), dim=-1), img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(F.normalize(model.encode_text(tok(TEXTS)), dim=-1), txt, atol=1e-5, rtol=1e-5)

    again = CultureCLIP.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(again.encode_image(x), img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.encode_text(TEXTS), txt, atol=1e-5, rtol=1e-5)


def test_checkpoint_file_with_builtin_arch(tmp_path):
    src = CultureCLIP.from_pretrained("cultureclip-tiny").eval()
    src.save_pretrained(tmp_path)
    loaded = CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / WEIGHTS_NAME)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.encode_image(x), src.encode_image(x))
    # a torch .pt state dict works too, read with weights_only=True
    torch.save(src.model.state_dict(), tmp_path / "sd.pt")
    loaded = CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / "sd.pt")).eval()
    torch.testing.assert_close(loaded.encode_image(x), src.encode_image(x))


def test_architecture_mismatch_is_refused(tmp_path):
    CultureCLIP.from_pretrained("cultureclip-tiny").save_pretrained(tmp_path)
    weights = str(tmp_path / WEIGHTS_NAME)
    # QuickGELU vs GELU: same tensor shapes, different function; only the recorded config can tell
    with pytest.raises(CheckpointMismatchError, match="quick_gelu"):
        CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=weights, force_quick_gelu=True)
    # context length: open_clip would silently interpolate the positional table; we refuse
    with pytest.raises(CheckpointMismatchError, match="context_length"):
        CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=weights, force_context_length=16)
    # width mismatch on a file without recorded config: the strict load names the file
    state = CultureCLIP.from_config(TINY_VIT).model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="other.safetensors"):
        CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / "other.safetensors"))
    # an edited config next to the weights is caught by the safetensors header
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg["model_cfg"]["quick_gelu"] = True
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="quick_gelu"):
        CultureCLIP.from_pretrained(tmp_path)


def test_quickgelu_tag_mismatch_refused_before_download():
    # ViT-B-32 + openai: open_clip only warns and computes different features; we refuse up front
    with pytest.raises(CheckpointMismatchError, match="ViT-B-32-quickgelu"):
        CultureCLIP.from_pretrained("ViT-B-32", pretrained="openai")


class Evil:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def test_pickled_checkpoint_is_refused_naming_the_file(tmp_path):
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    torch.save({"state_dict": {"encoder.x": Evil()}, "cultureclip": {}}, tmp_path / "evil.ckpt")
    for call in (lambda: CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / "evil.pt")),
                 lambda: CultureCLIP.from_pretrained(str(tmp_path / "evil.ckpt"))):
        with pytest.raises(UnsafeCheckpointError) as info:
            call()
        msg = str(info.value)
        assert "evil." in msg and "not a safe checkpoint" in msg and "weights_only=False" not in msg


@pytest.mark.slow  # a subprocess that imports torch, open_clip and the CLI: seconds of start-up
def test_zeroshot_tool_exits_cleanly_on_a_refused_checkpoint(tmp_path):
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "classes.txt").write_text("qipao\nkimono\n")
    (tmp_path / "images").mkdir()
    tool = Path(__file__).parents[1] / "tools" / "zeroshot_classify.py"
    proc = subprocess.run([sys.executable, str(tool), "--model", "cultureclip-tiny", "--pretrained",
                           str(tmp_path / "evil.pt"), "--images", str(tmp_path / "images"), "--classes",
                           str(tmp_path / "classes.txt"), "--out", str(tmp_path / "p.csv")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{tmp_path / 'evil.pt'} was refused: it is not a safe checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr and "unpickled!" not in proc.stderr + proc.stdout


def test_loading_weights_does_not_claim_random_init(tmp_path, caplog):
    src = CultureCLIP.from_pretrained("cultureclip-tiny")
    src.save_pretrained(tmp_path)
    caplog.set_level(logging.INFO)
    caplog.clear()  # src itself is a random init
    CultureCLIP.from_pretrained(tmp_path)
    CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / WEIGHTS_NAME))
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "initialized randomly" in m]
    assert messages.count(f"loaded weights from {tmp_path / WEIGHTS_NAME}") == 2
    caplog.clear()
    CultureCLIP.from_pretrained("cultureclip-tiny")  # a real random init still says so
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)


def test_in_memory_configs_never_overwrite_each_other():
    from open_clip.factory import _MODEL_CONFIGS
    from cultureclip.checkpoint_io import register_config
    a = CultureCLIP.from_config(TINY_VIT, name="same-name")
    other = json.loads(json.dumps(TINY_VIT))
    other["text_cfg"]["context_length"] = 16
    b = CultureCLIP.from_config(other, name="same-name")  # another config under the same name
    assert (a.context_length, b.context_length) == (24, 16)
    assert a.tokenize("kimono").shape[1] == 24  # a's registry entry was not replaced by b's
    key = register_config("same-name", TINY_VIT)
    assert register_config("same-name", TINY_VIT) == key  # identical re-registration is fine
    _MODEL_CONFIGS[key] = other  # someone else put a different config under our key
    try:
        with pytest.raises(ValueError, match="different model config named"):
            register_config("same-name", TINY_VIT)
    finally:
        _MODEL_CONFIGS[key] = json.loads(json.dumps(TINY_VIT))


def test_data_spec_carries_the_models_transforms_and_tokenizer(tiny_model):
    spec = tiny_model.data_spec()
    assert spec.preprocess_train is tiny_model.preprocess_train and spec.preprocess_val is tiny_model.preprocess_val
    assert spec.tokenizer is tiny_model.tokenizer and spec.supports_short_context is True


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        CultureCLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CultureCLIP.from_pretrained("ViT-Nonexistent-99")
