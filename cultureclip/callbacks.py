"""Pre-emption handling for the training entry point (Lightning glue; library modules never import it).

Lightning's own SIGTERM handling (its signal connector, installed at the start of every
fit/validate) only sets ``trainer.received_sigterm``; the loop then raises ``SIGTERMException`` (a
``SystemExit`` with exit status 0) after the current batch, without a checkpoint, and never while
the main process waits for a batch that does not come. :class:`Preemption` makes it explicit:

1. The first SIGTERM during training is noted; the current optimizer step finishes (all its
   accumulated micro-batches), ``last.ckpt`` is written atomically for that step, then Lightning's
   handler is called so that the loop logs the step and stops; the process exits with status 143
   and the line "pre-empted ... resume with ckpt_path=last" (:func:`exit_on_sigterm`).
2. If no step ends within ``grace_s`` seconds (e.g. the data stream is stuck), or a second SIGTERM
   comes, the run stops at once, without a new checkpoint; the previous ``last.ckpt`` is intact.

With DDP the ranks agree on the step to stop at (one all-reduce per optimizer step).
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger("cultureclip")

EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM
_LAST_STOP: dict[str, str] = {}  # the message of the last pre-emption in this process


class Preempted(SIGTERMException):
    """Raised when the run has to stop at once (no step ended within the grace period, or a second SIGTERM)."""


class Preemption(L.Callback):
    """Stop on SIGTERM at the next optimizer-step boundary with a fresh ``last.ckpt``.

    Args:
        ckpt_path: where to write the final checkpoint (the file ``ckpt_path=last`` resumes from).
        grace_s: seconds to wait for the current step to end before stopping without a checkpoint.
    """

    def __init__(self, ckpt_path: str, grace_s: float = 60.0) -> None:
        self.ckpt_path, self.grace_s = Path(ckpt_path), float(grace_s)
        self._requested: Optional[float] = None  # monotonic time of the first SIGTERM
        self._stopping = False  # the step boundary was reached: the stop is under way
        self._lightning_handler = None
        self._last_step = 0
        self._last_saved: Optional[int] = None
        self._timer: Optional[threading.Timer] = None
        self._previous = None  # the SIGTERM handler before on_fit_start, put back at teardown
        self._active = False  # between on_fit_start and the end of fit()
        self._main = threading.main_thread().ident

    # -------------------------------------------------------------- signal side
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning installs its handler (which then calls this one too): the first batch is
        # fetched before on_train_start, and a stream that never delivers it must still be stoppable
        if threading.current_thread() is threading.main_thread():  # signals are handled there only
            self._previous = signal.getsignal(signal.SIGTERM)
            self._active = True
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # restored by now when resuming
        if threading.current_thread() is not threading.main_thread():
            return
        # Lightning's handler (installed just before the loop) would stop the loop after any batch,
        # also inside an accumulation: keep it for the moment we stop, and handle SIGTERM alone
        self._lightning_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if not self._active:  # fit() is over (Lightning may re-install this handler on its way out)
            if callable(self._previous):
                return self._previous(signum, frame)
            if self._previous != signal.SIG_IGN:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)  # the default action: terminate
            return None
        if self._stopping:
            return  # e.g. the launcher forwarding the signal to this rank: already stopping
        if self._requested is not None:
            waited = time.monotonic() - self._requested
            saved = (f"the last checkpoint written by this run is at step {self._last_saved}"
                     if self._last_saved is not None else "this run wrote no checkpoint")
            msg = (f"pre-empted (SIGTERM): no training step ended within {waited:.0f}s (waiting for data?); "
                   f"stopped without a new checkpoint, {saved}; resume with ckpt_path=last")
            _LAST_STOP["message"] = msg
            self._finish()
            raise Preempted(msg)
        self._requested = time.monotonic()
        log.warning("SIGTERM: finishing the current step, then writing %s (at most %.0fs)", self.ckpt_path,
                    self.grace_s)
        self._timer = threading.Timer(self.grace_s, self._escalate)
        self._timer.daemon = True
        self._timer.start()

    def _escalate(self) -> None:
        if self._active and not self._stopping:  # a real signal interrupts a blocking wait, unlike interrupt_main()
            signal.pthread_kill(self._main, signal.SIGTERM)

    # -------------------------------------------------------------- loop side
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._last_saved = int(checkpoint.get("global_step", trainer.global_step))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        stepped, self._last_step = trainer.global_step != self._last_step, trainer.global_step
        if not stepped:
            return  # inside an accumulation: stopping here would drop the micro-batches seen so far
        stop = self._requested is not None
        if trainer.world_size > 1:  # every rank must stop after the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
        # the state right after an optimizer step, like ModelCheckpoint's on_train_batch_end saves
        trainer.save_checkpoint(self.ckpt_path)
        msg = (f"pre-empted (SIGTERM) at step {trainer.global_step}: saved {self.ckpt_path}; "
               f"resume with ckpt_path=last")
        _LAST_STOP["message"] = msg
        if trainer.is_global_zero:
            log.warning(msg)
        # Lightning's handler sets trainer.received_sigterm (and forwards the signal to the ranks its
        # launcher started): the loop logs this step, then raises SIGTERMException
        if callable(self._lightning_handler):
            self._lightning_handler(signal.SIGTERM, None)
        else:
            raise Preempted(msg)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._finish()
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)

    def _finish(self) -> None:
        self._active = False
        if self._timer is not None:
            self._timer.cancel()


@contextlib.contextmanager
def exit_on_sigterm(hard: bool = True):
    """Turn a SIGTERM stop (ours or Lightning's bare ``SIGTERMException``, exit status 0) into exit
    status 143 with one clear last line.

    Args:
        hard: after an immediate stop (:class:`Preempted`), run the exit handlers (the run-directory
            lock) and leave with ``os._exit``: normal interpreter shutdown would wait for whatever
            the stuck data source waits on (e.g. the child process of a ``pipe:`` shard).
    """
    _LAST_STOP.clear()
    try:
        yield
    except SIGTERMException as exn:
        msg = _LAST_STOP.get("message") or (str(exn) if exn.args and isinstance(exn.args[0], str) else "")
        if not msg:
            msg = ("stopped by SIGTERM outside a training step, or without the pre-emption callback: no new "
                   "checkpoint was written; resume with ckpt_path=last if checkpoints/last.ckpt exists")
        print(msg, file=sys.stderr, flush=True)
        if hard and isinstance(exn, Preempted):
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_PREEMPTED)
        raise SystemExit(EXIT_PREEMPTED) from None


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` for ``every_n_train_steps`` with this module's manual optimisation.

    Lightning (2.6) assumes a manually optimised module may want the state *before* its last optimizer
    step and warns on every run when no ``saved_models`` snapshot exists. Here ``training_step`` finishes
    whole optimizer steps, so the state at ``global_step`` N is exactly the state after N steps, which is
    what a resume needs; this callback saves it, as Lightning does for automatic optimisation.
    Step-based only: ``train_time_interval`` is refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._train_time_interval is not None:
            raise ValueError("StepCheckpoint saves every_n_train_steps; use ModelCheckpoint for train_time_interval")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._every_n_train_steps < 1 or trainer.global_step % self._every_n_train_steps:
            return
        if self._should_skip_saving_checkpoint(trainer):  # e.g. this step was saved at the previous micro-batch
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor is not None and self.monitor not in candidates:
            self._defer_save_until_validation = True
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_time_checked = time.monotonic()


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, with a validation total where ``sizes.json`` gives one.

    Shard loaders have no length, so Lightning's own bar shows validation without a total; the
    datamodule's :meth:`~cultureclip.data.datamodule.TwinDataModule.val_batches` counts it from ``sizes.json``.
    """

    @property
    def total_val_batches_current_dataloader(self):
        total = super().total_val_batches_current_dataloader
        if total == float("inf"):
            estimate = getattr(getattr(self.trainer, "datamodule", None), "val_batches", lambda: None)()
            if estimate:
                return estimate
        return total
