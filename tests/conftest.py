"""Shared fixtures: tiny open_clip models built in memory (no download, ever)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # any accidental hub access fails fast instead of hanging
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses the tests start (DDP ranks, CLIs)
# the test tensors are tiny: one thread avoids spin-waiting between 2 cores and loader workers
torch.set_num_threads(1)

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_RESNET = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture
def tiny_model():
    from cultureclip import CultureCLIP
    torch.manual_seed(0)
    return CultureCLIP.from_config(TINY_VIT, name="tiny-vit")


def randomize_lora(model, std=0.2, seed=0):
    """Give LoRA B matrices non-zero values so that adapters change the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)
