"""Run CLIP_benchmark's own command line, with one compatibility fix: ``python -m cultureclip.interop.benchmark_cli``.

Usage is exactly ``clip_benchmark``'s (``eval``/``build`` and all their options); a model saved by
``CultureCLIP.save_pretrained`` is given as ``--model local-dir:DIR`` (open_clip's local-folder schema,
which CLIP_benchmark's ``open_clip`` model type passes straight to ``create_model_and_transforms`` and
``get_tokenizer``)::

    python -m cultureclip.interop.benchmark_cli eval --model local-dir:runs/toy/model --pretrained "" \\
        --dataset imagenet1k-unverified --dataset_root DATA --custom_classname_file classes.json \\
        --custom_template_file templates.json --task zeroshot_classification --output result.json

The fix: CLIP_benchmark 1.6.2 computes top-k accuracy as ``float(array of shape [1])``, which NumPy
2.4 turned from a deprecation into a ``TypeError``, so its zero-shot classification stops after the
whole dataset has been encoded. Where (and only where) the installed ``accuracy`` fails that way, it is
replaced by the same arithmetic with a 0-d conversion; everything else is CLIP_benchmark's code. With an
older NumPy or a fixed CLIP_benchmark this is the plain ``clip_benchmark`` command.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """CLIP_benchmark's top-k accuracy (``metrics/zeroshot_classification.py``) without ``float(ndarray[1])``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()  # [k, N]
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [float(correct[:k].reshape(-1).float().sum()) / n for k in topk]


def needs_fix() -> bool:
    """Whether the installed CLIP_benchmark ``accuracy`` fails on this NumPy (probed on a 2x2 example)."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    try:
        zc.accuracy(torch.eye(2), torch.arange(2), topk=(1,))
    except TypeError:
        return True
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``clip_benchmark`` with ``argv`` (default: ``sys.argv[1:]``); returns its exit status."""
    try:
        from clip_benchmark import cli
        from clip_benchmark.metrics import zeroshot_classification as zc
    except ImportError as e:
        raise ImportError(f"CLIP_benchmark is not installed ({e}): pip install clip-benchmark") from e
    if needs_fix():
        zc.accuracy = accuracy
    sys.argv = ["clip_benchmark", *(sys.argv[1:] if argv is None else argv)]
    return cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
