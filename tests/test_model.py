"""CultureCLIP encoder: normalised features, short concept context, save -> plain open_clip load,
refusal of mismatched architectures, no unpickling."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cultureclip import CultureCLIP
from cultureclip.model import CONFIG_NAME, WEIGHTS_NAME, CheckpointMismatchError
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


def test_pickled_checkpoint_is_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))
    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception) as info:
        CultureCLIP.from_pretrained("cultureclip-tiny", pretrained=str(tmp_path / "evil.pt"))
    assert "unpickled" not in str(info.value) and not isinstance(info.value, SystemExit)


def test_missing_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        CultureCLIP.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CultureCLIP.from_pretrained("ViT-Nonexistent-99")
