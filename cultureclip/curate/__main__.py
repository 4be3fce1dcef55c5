"""``python -m cultureclip.curate stage=render|judge|export|all|import|[render,judge] [input=...] [key=value ...]``.

Composes ``conf/curate.yaml`` and hands the plain config to :func:`cultureclip.curate.app.run`. A run
that stops on bad input or settings prints ``error: <message>`` and exits 1 (no traceback; set
``CULTURECLIP_TRACEBACK=1`` for one); jobs that failed after their retries exit 2 (a rerun retries them).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cultureclip import logs, resolvers
from cultureclip.curate import app

resolvers.register()  # before @hydra.main composes the config


@hydra.main(version_base="1.3", config_path="../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    logs.quiet(logs.hydra_verbose())  # third-party INFO noise off unless hydra.verbose asks for it
    try:
        reports = app.run(OmegaConf.to_container(cfg, resolve=True))
    except (app.CurateError, ValueError, RuntimeError, OSError, ImportError) as exc:  # RecordError, StageMismatch...
        if os.environ.get("CULTURECLIP_TRACEBACK"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    failed = app.failed_jobs(reports)
    if failed:
        print(f"error: {failed} jobs failed after their retries (reasons in the reports above, details in each "
              f"stage's errors/ folder); run the same command again to retry them", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
