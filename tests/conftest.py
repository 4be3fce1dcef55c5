"""Shared fixtures: tiny open_clip models built in memory (no download, ever) and the embedded toy
twin-pair set, built once per test session."""
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


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """The default embedded toy set (seed 0), built once per session (~10 s): returns ``HOME/data/toy``,
    holding ``train/`` and ``val/`` shard folders with their ``sizes.json``.

    The layout matches the configs' defaults, so ``toy_shards.parent`` serves as ``paths.data_dir`` and
    ``toy_shards.parents[1]`` as ``paths.root_dir``. Tests must not write into it.
    """
    from cultureclip.data.toy import ensure_toy_shards
    return ensure_toy_shards(tmp_path_factory.mktemp("home") / "data" / "toy", seed=0)


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
