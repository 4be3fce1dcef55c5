"""A ``push_to_hub``-ready folder for a training run: the saved model plus a model card.

``python -m cultureclip.train`` leaves ``RUN_DIR/model/`` (open_clip's hub layout) and
``RUN_DIR/metrics.json`` (``before``/``after`` held-out metrics, ``global_step``, the resolved
``config`` and package ``versions``; see :func:`cultureclip.app.write_run_outputs`).
:func:`write_hub_folder` copies the model files and writes ``README.md``: YAML front matter (the
fields the Hub reads: ``library_name: open_clip``, ``license``, ``tags``, ``pipeline_tag``,
``base_model``) and a card whose recipe, data and before/after tables are rendered from
``metrics.json`` itself, so the card cannot disagree with the run. Uploading is a separate step
(:func:`push_folder`, ``huggingface_hub.HfApi().upload_folder``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from cultureclip.checkpoint_io import CONFIG_NAME, WEIGHTS_NAME, read_saved_dir
from cultureclip.interop import require

CARD_NAME = "README.md"
HUB_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME)  # what write_hub_folder writes, and all that push uploads
BASE_TAGS = ("clip", "open_clip", "zero-shot-image-classification", "cultureclip")
RECIPE_SECTIONS = ("model", "loss", "optim", "trainer")  # config groups that make up the training recipe
_SKIP_KEYS = ("_target_",)


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, Mapping):
        out = []
        for k, v in d.items():
            if k not in _SKIP_KEYS:
                out += _flatten(v, f"{prefix}{k}.")
        return out
    return [(prefix.rstrip("."), d)]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    text = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return text.replace("|", "\\|")  # a bare | would split the Markdown table cell


def _yaml_scalar(v: str) -> str:
    return json.dumps(v)  # a JSON string is a valid YAML double-quoted scalar


def base_model_id(config: Mapping[str, Any]) -> Optional[str]:
    """The Hub repository of the run's starting weights, when open_clip knows one (``hf_hub`` of the
    pretrained tag, e.g. ``timm/vit_base_patch32_clip_224.openai``), the ``hf-hub:`` id, or None."""
    model = config.get("model", {}) or {}
    name, tag = str(model.get("name", "")), model.get("pretrained")
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    if name.startswith("hf-transformers:") and not os.path.exists(name[len("hf-transformers:"):]):
        return name[len("hf-transformers:"):]
    if tag and not os.path.isfile(str(tag)):
        import open_clip
        hub = (open_clip.get_pretrained_cfg(name.replace("/", "-"), tag) or {}).get("hf_hub")
        return hub.strip("/") if hub else None
    return None


def model_card(metrics: Mapping[str, Any], repo_id: Optional[str] = None, license: str = "mit",
               base_model: Optional[str] = None, tags: Iterable[str] = ()) -> str:
    """The model card (``README.md`` text) for a run's ``metrics.json`` contents."""
    config = metrics.get("config", {}) or {}
    base_model = base_model or base_model_id(config)
    variant = (config.get("loss", {}) or {}).get("variant")
    all_tags = list(dict.fromkeys([*BASE_TAGS, *([f"loss-{variant}"] if variant else []), *tags]))
    front = ["---", "library_name: open_clip", f"license: {license}", "pipeline_tag: zero-shot-image-classification",
             "tags:", *[f"- {_yaml_scalar(t)}" for t in all_tags]]
    if base_model:
        front.append(f"base_model: {_yaml_scalar(base_model)}")
    front.append("---")
    title = repo_id or config.get("run_name") or "CultureCLIP model"
    lines = [*front, "", f"# {title}", "",
             "An open_clip CLIP model fine-tuned with cultureclip on cultural twin pairs (look-alike concepts "
             "from different cultures) with a twin hard-negative contrastive loss.", ""]
    if base_model:
        lines += [f"Starting weights: `{base_model}`.", ""]
    lines += ["## Results", "", "Held-out metrics of the starting model (before) and the fine-tuned model (after).", "",
              "| metric | before | after | change |", "|---|---|---|---|"]
    before, after = metrics.get("before", {}) or {}, metrics.get("after", {}) or {}
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k), after.get(k)
        change = f"{a - b:+.4f}" if a is not None and b is not None else ""
        lines.append(f"| {k} | {'' if b is None else f'{b:.4f}'} | {'' if a is None else f'{a:.4f}'} | {change} |")
    lines += ["", f"Training steps: {metrics.get('global_step', 'unknown')}.", "", "## Recipe", "",
              "| setting | value |", "|---|---|"]
    for section in RECIPE_SECTIONS:
        lines += [f"| {k} | {_value(v)} |" for k, v in _flatten(config.get(section, {}), f"{section}.")]
    if "seed" in config:
        lines.append(f"| seed | {config['seed']} |")
    lines += ["", "## Data", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in _flatten(config.get("data", {}), "data.")]
    ref = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/THIS/FOLDER"
    lines += ["", "## Use", "", "```python", "import open_clip", "",
              f"model, _, preprocess = open_clip.create_model_and_transforms({ref!r})",
              f"tokenizer = open_clip.get_tokenizer({ref!r})", "```", ""]
    versions = metrics.get("versions") or {}
    if versions:
        lines += ["## Versions", "", *[f"- {k}: {v}" for k, v in sorted(versions.items())], ""]
    return "\n".join(lines)


def write_hub_folder(run_dir: Union[str, os.PathLike], out: Union[str, os.PathLike], repo_id: Optional[str] = None,
                     license: str = "mit", base_model: Optional[str] = None, tags: Iterable[str] = (),
                     model_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Copy ``RUN_DIR/model`` (or ``model_dir``) into ``out`` and write the model card from
    ``RUN_DIR/metrics.json``. Files are written under temporary names and renamed, card last.

    Raises:
        FileNotFoundError: naming the missing ``metrics.json`` or model file.
    """
    run_dir, out = Path(run_dir), Path(out)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: not a finished cultureclip.train run directory")
    metrics = json.loads(metrics_file.read_text())
    model_dir = Path(model_dir) if model_dir is not None else run_dir / "model"
    _, weights = read_saved_dir(model_dir)  # checks both files exist
    out.mkdir(parents=True, exist_ok=True)
    card = model_card(metrics, repo_id=repo_id, license=license, base_model=base_model, tags=tags)
    for src, name in ((weights, WEIGHTS_NAME), (model_dir / CONFIG_NAME, CONFIG_NAME)):
        shutil.copyfile(src, out / (name + ".tmp"))
        os.replace(out / (name + ".tmp"), out / name)
    (out / (CARD_NAME + ".tmp")).write_text(card, encoding="utf-8")
    os.replace(out / (CARD_NAME + ".tmp"), out / CARD_NAME)
    return out


def folder_files(folder: Union[str, os.PathLike], names: Iterable[str]) -> list[str]:
    """The paths (relative, ``/``-separated) under ``folder`` that ``names`` select: a file name, or a
    folder name for every file below it. Raises FileNotFoundError naming a missing one."""
    folder, out = Path(folder), []
    for name in names:
        path = folder / name
        if path.is_dir():
            out += sorted(p.relative_to(folder).as_posix() for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            out.append(Path(name).as_posix())
        else:
            raise FileNotFoundError(f"{path} not found: it should have been written before the upload")
    return out


def push_folder(folder: Union[str, os.PathLike], repo_id: str, files: Sequence[str], private: bool = True,
                token: Optional[str] = None, repo_type: str = "model", commit_message: str = "Upload CultureCLIP model",
                api: Any = None) -> str:
    """Create the repository if needed (private unless ``private=False``) and upload ``files`` of ``folder``.

    Only the listed files go up (``allow_patterns`` of ``upload_folder``): anything else that sits in the
    folder (notes, a venv, another run's files) stays local. Returns the commit URL.

    Args:
        folder: the folder the files are in.
        repo_id: the Hub repository.
        files: paths relative to ``folder`` (:func:`folder_files`).
        private: create the repository as private (an existing repository keeps its visibility).
        token: a Hugging Face token (default: the login or ``HF_TOKEN``).
        repo_type: ``model`` or ``dataset``.
        commit_message: the upload's commit message.
        api: an ``HfApi`` (default: a new one with ``token``).
    """
    if not files:
        raise ValueError(f"nothing to upload from {folder}")
    api = api if api is not None else require("huggingface_hub").HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type,
                             commit_message=commit_message, allow_patterns=list(files))
    return str(getattr(info, "commit_url", info))
