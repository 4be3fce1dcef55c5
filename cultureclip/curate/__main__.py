"""``python -m cultureclip.curate stage=render|judge|export|all|import|[render,judge] [input=...] [key=value ...]``.

Composes ``conf/curate.yaml`` and hands the plain config to :func:`cultureclip.curate.app.run`. A run
that stops on bad input or settings prints ``error: <message>`` and exits 1 (no traceback; set
``CULTURECLIP_TRACEBACK=1`` for one); jobs that failed after their retries exit 2 (a rerun retries them).
Ctrl-C (SIGINT) or SIGTERM stops within a second or two: requests in flight are abandoned, the finished
records are written, and the same command continues (exit 130 / 143).
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cultureclip import errors, logs, resolvers
from cultureclip.curate import app
from cultureclip.curate.sanitize import install_log_filter

resolvers.register()  # before @hydra.main composes the config


def _stop_on_sigterm(signum, frame) -> None:
    # the same path as Ctrl-C: requests in flight are abandoned, finished records are flushed
    raise KeyboardInterrupt("SIGTERM")


@hydra.main(version_base="1.3", config_path="../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    logs.quiet(logs.hydra_verbose())  # third-party INFO noise off unless hydra.verbose asks for it
    install_log_filter()  # Hydra's handlers (console, <out_dir>/curate.log) never write a registered key
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        reports = app.run(OmegaConf.to_container(cfg, resolve=True))
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (a scheduler's pre-emption): the stages wrote what finished
        name = str(exc) or "SIGINT"
        print(f"error: stopped by {name}; the jobs that finished are written: run the same command again to do "
              f"the rest", file=sys.stderr)
        # Everything is on disk (parts are fsynced, locks released): skip the interpreter's teardown, whose
        # garbage collection of torch & co. takes seconds, and the join of abandoned request threads.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if name == "SIGTERM" else 130)
    except (app.CurateError, ValueError, RuntimeError, OSError, ImportError) as exc:  # RecordError, StageMismatch...
        sys.exit(errors.report(exc))
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = app.failed_jobs(reports)
    if failed:
        print(f"error: {failed} jobs failed after their retries (reasons in the reports above, details in each "
              f"stage's errors/ folder); run the same command again to retry them", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
