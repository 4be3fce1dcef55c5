"""Evaluate one model: ``python -m cultureclip.evaluate model=vit_b32_openai eval=[twins,cultural] [key=value ...]``.

Composes ``conf/evaluate.yaml``, builds the model (never with adapters), runs every task of
``eval.tasks`` (each a ``_partial_`` of a :mod:`cultureclip.eval.tasks` function), writes one result
JSON per task into ``results_dir`` and then ``report.md`` with its plots.
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cultureclip import resolvers
from cultureclip.eval import report, tasks
from cultureclip.eval.results import write_result

resolvers.register()  # before @hydra.main composes the config


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Run the configured tasks; returns ``({task key: result path}, {"model": model})``."""
    todo = {k: v for k, v in (cfg.eval.get("tasks") or {}).items() if v is not None}  # key=null drops a task
    if not todo:
        raise ValueError("no evaluation tasks: pick some with eval=twins or eval=[twins,cultural]")
    torch.manual_seed(cfg.seed)  # random-init architectures get the same weights in every run
    model = instantiate(cfg.model, lora=None, device=tasks.resolve_device(cfg.device)).eval()
    label, pretrained = tasks.model_label(cfg.model.name, cfg.model.pretrained)
    out_dir = Path(cfg.results_dir)
    paths = {}
    for key, task_cfg in todo.items():
        metrics, header, extra = instantiate(task_cfg, _convert_="all")(model)
        paths[key] = write_result(out_dir, model=label, pretrained=pretrained, metrics=metrics, extra=extra,
                                  **header)
        print(f"{key}: {paths[key]}")
        if metrics.get("n_skipped"):  # counted by the data path; its warnings name the items
            print(f"{key}: {int(metrics['n_skipped'])} samples were skipped")
    if cfg.report:
        print(f"report: {report.write_report(out_dir)}")
    return paths, {"model": model}


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
