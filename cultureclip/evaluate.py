"""Evaluate one model: ``python -m cultureclip.evaluate model=vit_b32_openai eval=[twins,cultural] [key=value ...]``.

Composes ``conf/evaluate.yaml``, builds the model (never with adapters), runs every task of
``eval.tasks`` (each a ``_partial_`` of a :mod:`cultureclip.eval.tasks` function), writes one result
JSON per task into ``results_dir`` and then ``report.md`` with its plots. ``eval=wiseft`` instead runs
the tasks at every alpha of a base/fine-tuned mix and writes the trade-off table and plot
(:func:`cultureclip.eval.wiseft.run_wiseft`).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cultureclip import CultureCLIP, errors, logs, resolvers
from cultureclip.eval import report, tasks, wiseft
from cultureclip.eval.results import write_result

resolvers.register()  # before @hydra.main composes the config


def evaluate(cfg: DictConfig) -> tuple[dict, dict]:
    """Run the configured tasks; returns ``({task key: result path}, {"model": model})``."""
    todo = {k: v for k, v in (cfg.eval.get("tasks") or {}).items() if v is not None}  # key=null drops a task
    if not todo:
        raise ValueError("no evaluation tasks: pick some with eval=twins or eval=[twins,cultural]")
    torch.manual_seed(cfg.seed)  # random-init architectures get the same weights in every run
    device, wise = tasks.resolve_device(cfg.device), cfg.eval.get("wiseft")
    model = instantiate(wise.base if wise else cfg.model, lora=None, device=device).eval()
    fns = {key: instantiate(task_cfg, _convert_="all") for key, task_cfg in todo.items()}
    if wise:  # the base model above, the fine-tuned one from its saved folder or checkpoint
        finetuned = CultureCLIP.from_pretrained(wise.finetuned, device=device).eval()
        paths = wiseft.run_wiseft(model, finetuned, fns, list(wise.alphas), wise.out_dir, wise.x_metric, wise.y_metric,
                                  wise.columns, OmegaConf.to_container(wise, resolve=True), wise.tasks)
        return paths, {"model": model, "finetuned": finetuned}
    label, pretrained = tasks.model_label(cfg.model.name, cfg.model.pretrained)
    out_dir, paths = Path(cfg.results_dir), {}
    for key, fn in fns.items():
        metrics, header, extra = fn(model)
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
    logs.quiet(logs.hydra_verbose())  # third-party INFO noise off unless hydra.verbose asks for it
    with errors.exit_on_user_error():  # bad settings or inputs: one line naming them, exit status 1
        evaluate(cfg)


if __name__ == "__main__":
    main()
