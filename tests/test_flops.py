"""FLOP counting against hand counts, a count that leaves the model untouched, and the peak table."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cultureclip import flops

B, L, E, H = 4, 6, 16, 2


class TinyAttention(nn.Module):
    """One attention block with explicit projections, so every matmul is hand-countable."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(E, 3 * E, bias=False), nn.Linear(E, E, bias=False)

    def forward(self, x):  # x [B, L, E]
        q, k, v = self.qkv(x).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)  # each [B, H, L, E/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, E/H]
        return self.out(y.transpose(1, 2).reshape(B, L, E))


def test_linear_layers_match_the_hand_count():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(B, 8)  # no gradient: the first layer's backward is its weight gradient only
    fwd, train = flops.count_train_flops(mlp, lambda: mlp(x).square().sum())
    f1, f2 = 2 * B * 8 * 32, 2 * B * 32 * 4  # 2 FLOPs per multiply-add
    assert fwd == f1 + f2
    assert train == (f1 + f2) + f1 + 2 * f2  # backward: dW1; dW2 and the input gradient of layer 2


def test_attention_matches_the_hand_count():
    torch.manual_seed(0)
    block, x = TinyAttention(), torch.randn(B, L, E)
    fwd, train = flops.count_train_flops(block, lambda: block(x).sum())
    qkv, out = 2 * B * L * E * 3 * E, 2 * B * L * E * E
    attn = 2 * (2 * B * H * L * L * (E // H))  # QK^T and PV (the causal half is still computed densely)
    assert fwd == qkv + attn + out
    # backward: dW of the qkv projection (x needs no gradient), dQ dK dV through attention (2x its
    # forward), dW and dX of the output projection
    assert train == fwd + qkv + 2 * attn + 2 * out


def test_counting_leaves_gradients_buffers_and_rng_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    net(x)  # materialise the lazy layer
    stats = net[1].running_mean.clone()
    rng = torch.get_rng_state()
    fwd, train = flops.count_train_flops(net, lambda: net(x).sum())
    assert 0 < fwd < train
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(net[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5), ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA H100 NVL", "bf16", 835.5),
    ("NVIDIA H200", "bf16", 989.5), ("NVIDIA H200 NVL", "tf32", 417.5), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-PCIE-40GB", "fp32", 19.5), ("NVIDIA L4", "bf16", 121.0), ("NVIDIA L40S", "bf16", 366.5),
    ("NVIDIA L40", "fp32", 90.5), ("NVIDIA A10", "bf16", 125.0), ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("NVIDIA H100 80GB HBM3", "fp16", 989.5), ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
])
def test_peak_table(name, dtype, tflops):
    assert flops.peak_flops(name, dtype) == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("name", ["NVIDIA A10G", "NVIDIA GH200 480GB", "Tesla V100-SXM2-16GB", "cpu", "", None,
                                  "AMD Instinct MI300X"])
def test_unknown_devices_get_no_peak(name):
    assert flops.peak_flops(name) is None
    assert flops.mfu(1e12, flops.peak_flops(name)) is None


def test_precision_to_compute_dtype_and_bad_dtype():
    assert flops.compute_dtype("bf16-mixed") == "bf16" and flops.compute_dtype("16-mixed") == "bf16"
    assert flops.compute_dtype("32-true") in ("fp32", "tf32") and flops.compute_dtype("64-true") is None
    assert flops.mfu(494.75e12, flops.peak_flops("NVIDIA H100 80GB HBM3")) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="dtype"):
        flops.peak_flops("NVIDIA L4", "int8")
