"""FLOPs of a training step (torch's flop counter) and model-FLOPs utilisation against datasheet peaks.

Plain torch, no Lightning: :class:`cultureclip.lit_module.CultureCLIPModule` counts one micro-batch at
start-up with :func:`count_train_flops` and divides achieved FLOP/s by :func:`peak_flops`.

MFU here is *model* FLOPs utilisation as in the PaLM paper's appendix: the matmul/conv FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` attributes to the step (2 per multiply-add; elementwise
ops, softmax and norms are not counted), divided by the device's peak *dense* tensor-core rate for the
step's precision. Sparsity figures (the larger numbers in NVIDIA's datasheets) are not peaks a dense
step can reach, so the table holds the dense ones.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Peak dense TFLOP/s per device: (bf16/fp16 tensor core, tf32 tensor core, fp32 non-tensor).
# Datasheet figures "with sparsity" are halved to the dense rate. Sources:
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (BF16 1,979 / 1,513 / 1,671 sparse;
#     TF32 989 / 756 / 835 sparse; FP32 67 / 51 / 60).
#   H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet (BF16 1,979 / 1,671 sparse; TF32 989 / 835
#     sparse; FP32 67 / 60).
#   A100 (SXM and PCIe, 40 and 80 GB): NVIDIA A100 datasheet (BF16 312, TF32 156, FP32 19.5 dense).
#   L4: NVIDIA L4 datasheet (BF16 242 sparse, TF32 120 sparse, FP32 30.3).
#   L40S: NVIDIA L40S datasheet (BF16 733 sparse, TF32 366 sparse, FP32 91.6).
#   L40: NVIDIA L40 datasheet (BF16 362.1 sparse, TF32 181 sparse, FP32 90.5).
#   A10: NVIDIA A10 datasheet (BF16 250 sparse, TF32 125 sparse, FP32 31.2).
#   RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix table (BF16 with FP32 accumulate
#     165.2 dense, TF32 82.6 dense, FP32 82.6).
#   RTX 3090: NVIDIA Ampere GA102 architecture whitepaper (BF16 with FP32 accumulate 71, TF32 35.6
#     dense, FP32 35.6).
# Not listed on purpose: the A10G (AWS's variant; NVIDIA publishes no datasheet for it), GH200 and any
# device not named above: they get no MFU rather than a guessed peak.
_PEAKS: list[tuple[str, str, tuple[float, float, float]]] = [
    # (pattern on torch.cuda.get_device_name, table name, (bf16, tf32, fp32) dense TFLOP/s); first match wins
    (r"\bH100\b.*\bNVL\b", "H100 NVL", (835.5, 417.5, 60.0)),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", (756.5, 378.0, 51.0)),
    (r"\bH100\b", "H100 SXM", (989.5, 494.5, 67.0)),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH200\b.*\bNVL\b", "H200 NVL", (835.5, 417.5, 60.0)),
    (r"\bH200\b", "H200 SXM", (989.5, 494.5, 67.0)),
    (r"\bA100\b", "A100", (312.0, 156.0, 19.5)),
    (r"\bL40S\b", "L40S", (366.5, 183.0, 91.6)),
    (r"\bL40\b", "L40", (181.0, 90.5, 90.5)),
    (r"\bL4\b", "L4", (121.0, 60.0, 30.3)),
    (r"\bA10\b", "A10", (125.0, 62.5, 31.2)),  # \b: "A10G" and "A100" do not match
    (r"\bRTX 4090\b", "RTX 4090", (165.2, 82.6, 82.6)),
    (r"\bRTX 3090\b", "RTX 3090", (71.0, 35.6, 35.6)),
]
_COLUMNS = {"bf16": 0, "fp16": 0, "tf32": 1, "fp32": 2}


def peak_flops(device_name: Optional[str], dtype: str = "bf16") -> Optional[float]:
    """Peak dense FLOP/s of a device for a compute type, or None when the device is not in the table.

    Args:
        device_name: e.g. ``torch.cuda.get_device_name()`` ("NVIDIA H100 80GB HBM3"); None or "cpu": None.
        dtype: ``"bf16"``/``"fp16"`` (tensor cores), ``"tf32"`` (fp32 matmuls on tensor cores) or ``"fp32"``.
    """
    if dtype not in _COLUMNS:
        raise ValueError(f"dtype must be one of {sorted(_COLUMNS)}, got {dtype!r}")
    if not device_name:
        return None
    for pattern, _, peaks in _PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks[_COLUMNS[dtype]] * 1e12
    return None


def compute_dtype(precision: str) -> Optional[str]:
    """The matmul compute type of a Lightning ``precision`` string, for :func:`peak_flops`.

    ``32-true`` is tf32 when torch lets fp32 matmuls use tensor cores (``torch.backends.cuda.matmul.
    allow_tf32``, set by ``torch.set_float32_matmul_precision("high")``), else fp32; fp64 has no entry.
    """
    p = str(precision)
    if p.startswith(("bf16", "16")):
        return "bf16"  # fp16 and bf16 have the same tensor-core rate on every device in the table
    if p.startswith("32"):
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's flop counter attributes to ``fn()`` (forward, and backward if ``fn`` runs one).

    Attention runs on the math backend while counting: the counter has formulas for the CUDA flash /
    memory-efficient kernels but not for the CPU flash kernel (it would count 0 there), while the math
    backend's matmuls are counted everywhere, so a count is the same on every device.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def count_train_flops(model: nn.Module, loss_fn: Callable[[], torch.Tensor]) -> tuple[int, int]:
    """FLOPs of ``loss_fn()`` without gradient, and of its forward + backward, leaving ``model`` untouched.

    The backward runs through ``torch.autograd.grad`` (``.grad`` fields stay as they are), the RNG
    states are forked and the buffers (e.g. BatchNorm running statistics) restored, so counting at the
    start of a run changes neither its gradients, its random stream nor a resumed run's exactness.

    Count with ``model`` in training mode: in eval mode under ``no_grad``, ``nn.MultiheadAttention``
    takes a fused fast path that the counter does not see (a ViT-B/32 image then counts 5.9 instead of
    8.8 GFLOPs).

    Returns:
        ``(forward_flops, forward_backward_flops)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            with torch.no_grad():
                forward = count_flops(loss_fn)

            def train_step():
                loss = loss_fn()
                torch.autograd.grad(loss, params, allow_unused=True)

            train = count_flops(train_step)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return forward, train


def mfu(flops_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Achieved over peak FLOP/s; None when the peak is unknown (CPU, an unlisted GPU)."""
    return None if not peak else flops_per_s / peak
