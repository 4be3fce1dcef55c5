"""The tokenizer of a model, chosen from its built text config, never from its name.

open_clip's ``get_tokenizer(name)`` falls back on the *name*: a config registered under a name that
contains "siglip" gets ``SigLipTokenizer`` (and downloads a SentencePiece model), whatever its
``text_cfg`` says. Here the config alone decides:

- ``text_cfg.hf_tokenizer_name`` set: open_clip's ``HFTokenizer`` from that source, with the config's
  ``tokenizer_kwargs`` and ``tokenizer_mode``; a saved model directory that holds tokenizer files
  (``save_pretrained`` writes them) is used instead of the recorded source, so a reload never needs the Hub;
- otherwise open_clip's ``SimpleTokenizer`` (CLIP's BPE) with the config's ``tokenizer_kwargs``.
"""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path
from typing import Optional, Union

from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_local_tokenizer(directory: Union[str, Path]) -> bool:
    """Whether ``directory`` holds a saved Hugging Face tokenizer."""
    return any((Path(directory) / name).is_file() for name in HF_TOKENIZER_FILES)


def tokenizer_for(model_cfg: dict, local_dir: Optional[Union[str, Path]] = None,
                  context_length: Optional[int] = None, cache_dir: Optional[str] = None):
    """The tokenizer ``model_cfg`` (open_clip's layout) asks for.

    Args:
        model_cfg: the architecture dict (its ``text_cfg`` is read).
        local_dir: a saved model directory; its tokenizer files win over ``hf_tokenizer_name``.
        context_length: overrides ``text_cfg.context_length``.
        cache_dir: Hugging Face cache for a tokenizer named by a Hub id.
    """
    text_cfg = model_cfg.get("text_cfg", {})
    length = context_length or text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    source = text_cfg.get("hf_tokenizer_name")
    if source:
        if local_dir is not None and has_local_tokenizer(local_dir):
            source = str(local_dir)
        return HFTokenizer(source, context_length=length, cache_dir=cache_dir,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    return SimpleTokenizer(context_length=length, **kwargs)


def save_tokenizer(tokenizer, directory: Path) -> bool:
    """Write a Hugging Face tokenizer's files into ``directory`` (where open_clip's ``local-dir:`` reads
    them); returns False for a tokenizer that needs no files (CLIP's BPE ships with open_clip)."""
    inner = getattr(tokenizer, "tokenizer", None)
    if not isinstance(tokenizer, HFTokenizer) or inner is None:
        return False
    inner.save_pretrained(str(directory))
    return True


def save_text_files(model_cfg: dict, tokenizer, text_tower, directory: Path) -> dict:
    """Write what the text side needs offline into a model ``directory``; returns the config to record.

    A Hugging Face tokenizer's files and a Hugging Face text tower's ``config.json`` go into the model
    directory itself, where open_clip's ``local-dir:`` looks for the tokenizer; the recorded
    ``hf_model_name``/``hf_tokenizer_name`` then name that directory, so plain open_clip rebuilds the
    tower and tokenizer from these files without the Hub (``CultureCLIP.from_pretrained`` reads them from
    the directory wherever it is moved).
    """
    cfg = deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    directory.mkdir(parents=True, exist_ok=True)
    if save_tokenizer(tokenizer, directory):
        text_cfg["hf_tokenizer_name"] = str(directory.resolve())
    hf_config = getattr(text_tower, "config", None)
    if "hf_model_name" in text_cfg and hf_config is not None:
        hf_config.save_pretrained(str(directory))
        text_cfg["hf_model_name"] = str(directory.resolve())
    return cfg
