"""What the twin-pair data pipeline needs from a model: its transforms and tokenizer.

``CultureCLIP.data_spec()`` builds one; ``TwinDataModule`` receives it at construction, so the data side
never holds (or waits for) the model itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class DataSpec:
    """Model-dependent inputs of the twin pipeline.

    Attributes:
        preprocess_train: PIL image -> [3, H, W] tensor, with training augmentation.
        preprocess_val: PIL image -> [3, H, W] tensor, deterministic.
        tokenizer: ``tokenizer(list_of_str, context_length=L) -> int64 [N, L]``.
        supports_short_context: whether texts may be tokenised shorter than the model's context length
            without changing their features (see ``CultureCLIP.supports_short_context``).
    """

    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    supports_short_context: bool
