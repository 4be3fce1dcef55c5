"""Run-directory safety in-process: the lock, ckpt_path=last resolution, atomic checkpoint writes
(disk full through a real file object), merged metrics logs, kept "before" metrics, and the SIGTERM
callback's step-boundary stop and its escape when no step ends."""
import csv
import errno
import io
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cultureclip import rundir
from cultureclip.app import AtomicCheckpointIO
from cultureclip.callbacks import EXIT_PREEMPTED, Preempted, Preemption, exit_on_sigterm


# ------------------------------------------------------------------------------------------- lock
def _write_lock(run_dir: Path, pid: int, host: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host, "since": "earlier"}))


def test_lock_records_owner_and_is_released(tmp_path):
    lock = rundir.RunDirLock(tmp_path / "run").acquire()
    owner = json.loads((tmp_path / "run" / ".lock").read_text())
    assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
    assert rundir.RunDirLock(tmp_path / "run").acquire().held  # the same process may enter again
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_lock_of_a_live_process_is_refused_with_a_hint(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, other.pid, socket.gethostname())
        with pytest.raises(rundir.RunDirLocked, match=rf"in use by pid {other.pid} on host .*run_name="):
            rundir.RunDirLock(tmp_path).acquire()
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == other.pid  # untouched
    finally:
        other.kill()
        other.wait()


def test_stale_lock_is_taken_over_and_a_foreign_host_is_not(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, dead.pid, socket.gethostname())
    with caplog.at_level("WARNING"):
        lock = rundir.RunDirLock(tmp_path).acquire()
    assert f"stale lock {tmp_path / '.lock'} of pid {dead.pid}" in caplog.text
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    # a pid on another machine cannot be checked from here: refused, never taken over
    _write_lock(tmp_path, dead.pid, "some-other-host")
    with pytest.raises(rundir.RunDirLocked, match="on host some-other-host"):
        rundir.RunDirLock(tmp_path).acquire()


def _race(run_dir, start, results):
    start.wait()
    try:
        rundir.RunDirLock(run_dir).acquire()
        results.put("won")
        time.sleep(1.0)  # hold it while the others try
    except rundir.RunDirLocked:
        results.put("refused")


def test_processes_starting_together_exactly_one_gets_the_lock(tmp_path):
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / "run", start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    outcome = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join()
    assert outcome == ["refused"] * 3 + ["won"]


@pytest.mark.parametrize("env,owner", [({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
                                       ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False), ({"RANK": "0"}, True),
                                       ({"RANK": "3", "LOCAL_RANK": "0"}, False)])
def test_only_global_rank_zero_owns_the_run_dir(monkeypatch, env, owner):
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert rundir.is_launch_owner() is owner


# ------------------------------------------------------------------------------------------- checkpoints
def test_resolve_ckpt_path(tmp_path):
    assert rundir.resolve_ckpt_path(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*start a fresh run with ckpt_path=null"):
        rundir.resolve_ckpt_path(tmp_path, "last")
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "step0000004.ckpt").write_bytes(b"x" * 10)
    (ckpts / ".last.ckpt.tmp-99").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError) as err:
        rundir.resolve_ckpt_path(tmp_path, "last")
    msg = str(err.value)
    assert "last.ckpt does not exist" in msg and "step0000004.ckpt" in msg and ".last.ckpt.tmp-99" in msg
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist"):
        rundir.resolve_ckpt_path(tmp_path, str(tmp_path / "nope.ckpt"))
    (ckpts / "last.ckpt").write_bytes(b"y")
    assert rundir.resolve_ckpt_path(tmp_path, "last") == ckpts / "last.ckpt"
    assert rundir.resolve_ckpt_path(tmp_path, str(ckpts / "step0000004.ckpt")) == ckpts / "step0000004.ckpt"


class _FailingFile(io.FileIO):
    """A real file whose writes fail once ``limit`` bytes are written, like a full disk."""

    def __init__(self, path, limit, exc):
        super().__init__(path, "wb")
        self.limit, self.exc = limit, exc

    def write(self, data):
        if self.tell() + len(data) > self.limit:
            super().write(bytes(data)[: max(0, self.limit - self.tell())])
            raise self.exc
        return super().write(data)


def test_disk_full_while_checkpointing_says_so_and_keeps_the_previous_file(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    full = OSError(errno.ENOSPC, "No space left on device")
    io_ = AtomicCheckpointIO(opener=lambda p: _FailingFile(p, 4096, full))
    with pytest.raises(OSError) as err:
        io_.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, target)
    assert err.value.errno == errno.ENOSPC
    assert str(err.value).startswith("[Errno 28] No space left on device while writing checkpoint")
    assert str(target) in str(err.value)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # the partial file is gone
    assert torch.load(target, weights_only=True) == {"step": 1}


def test_interrupted_checkpoint_write_keeps_previous_file(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)
    io_ = AtomicCheckpointIO(opener=lambda p: _FailingFile(p, 100, KeyboardInterrupt("killed while writing")))
    with pytest.raises((KeyboardInterrupt, RuntimeError)):  # torch.save reports it as a RuntimeError
        io_.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------------------------------- logs, before
def _write_csv(path, rows):
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_metrics_logs_of_all_attempts_merge_with_each_step_once(tmp_path):
    train = lambda step, loss: {"epoch": 0, "step": step, "train/loss": loss}  # noqa: E731
    val = lambda step, acc: {"epoch": 0, "step": step, "val/acc": acc}  # noqa: E731
    # attempt 1 ran steps 0-5 (checkpoint at step 4, so 4 and 5 are run again), validated at 1 and 3
    _write_csv(tmp_path / "metrics.csv", [val(0, 0.1), train(0, 9), train(1, 8), val(1, 0.2), train(2, 7),
                                         train(3, 6), val(3, 0.3), train(4, 5.5), train(5, 4.5)])
    assert rundir.archive_metrics_log(tmp_path).name == "metrics.attempt-1.csv"
    _write_csv(tmp_path / "metrics.csv", [train(4, 5), train(5, 4), val(5, 0.4), train(6, 3)])
    merged = rundir.merge_metrics_logs(tmp_path)
    with open(merged, newline="") as f:
        rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    got = [(int(r["step"]), "train" if "train/loss" in r else "val", float(r.get("train/loss", r.get("val/acc"))))
           for r in rows]
    assert got == [(0, "val", 0.1), (0, "train", 9), (1, "train", 8), (1, "val", 0.2), (2, "train", 7),
                   (3, "train", 6), (3, "val", 0.3), (4, "train", 5), (5, "train", 4), (5, "val", 0.4),
                   (6, "train", 3)]
    assert (tmp_path / "metrics.attempt-1.csv").is_file()  # kept beside it
    # a further resume archives the merged file as attempt 2; merging again changes nothing
    assert rundir.archive_metrics_log(tmp_path).name == "metrics.attempt-2.csv"
    _write_csv(tmp_path / "metrics.csv", [train(6, 3)])
    with open(rundir.merge_metrics_logs(tmp_path), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(got)


def test_before_metrics_are_saved_once_and_reused(tmp_path):
    assert rundir.load_or_compute_before(tmp_path, lambda: {"val/acc": 0.25}, resuming=False) == {"val/acc": 0.25}
    assert json.loads((tmp_path / "before_metrics.json").read_text()) == {"val/acc": 0.25}

    def must_not_run():
        raise AssertionError("a resumed run measured 'before' again")
    assert rundir.load_or_compute_before(tmp_path, must_not_run, resuming=True) == {"val/acc": 0.25}
    assert rundir.load_or_compute_before(tmp_path / "x", must_not_run, resuming=True) == {}
    assert rundir.load_or_compute_before(tmp_path / "y", must_not_run, resuming=False, enabled=False) == {}


# ------------------------------------------------------------------------------------------- SIGTERM
class _FakeTrainer(SimpleNamespace):
    def save_checkpoint(self, path):
        self.saved.append((str(path), self.global_step))


@pytest.fixture
def sigterm_restored():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_stops_after_the_optimizer_step_with_a_checkpoint(tmp_path, sigterm_restored):
    lightning_calls = []
    cb = Preemption(str(tmp_path / "last.ckpt"), grace_s=30)
    trainer = _FakeTrainer(global_step=3, world_size=1, is_global_zero=True, saved=[])
    outer = signal.getsignal(signal.SIGTERM)
    cb.on_fit_start(trainer, None)
    signal.signal(signal.SIGTERM, lambda *a: lightning_calls.append(a))  # stands for Lightning's handler
    cb.on_train_start(trainer, None)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs in this (main) thread
    assert not lightning_calls and not trainer.saved  # noted only
    cb.on_train_batch_end(trainer, None, None, None, 0)  # a micro-batch of an accumulation: no step yet
    assert not trainer.saved
    trainer.global_step = 4
    cb.on_train_batch_end(trainer, None, None, None, 1)
    assert trainer.saved == [(str(tmp_path / "last.ckpt"), 4)]
    assert len(lightning_calls) == 1  # Lightning is told now: it logs the step and stops the loop
    os.kill(os.getpid(), signal.SIGTERM)  # e.g. forwarded by a launcher while stopping: ignored
    time.sleep(0.05)
    with pytest.raises(SystemExit) as stop, exit_on_sigterm(hard=False):
        raise SIGTERMException()
    assert stop.value.code == EXIT_PREEMPTED
    cb.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGTERM) == outer  # put back after fit()


def test_sigterm_while_no_step_ends_stops_after_the_grace_period(tmp_path, sigterm_restored, capsys):
    cb = Preemption(str(tmp_path / "last.ckpt"), grace_s=0.5)
    trainer = _FakeTrainer(global_step=7, world_size=1, is_global_zero=True, saved=[])
    cb.on_fit_start(trainer, None)
    cb.on_train_start(trainer, None)
    cb.on_save_checkpoint(trainer, None, {"global_step": 6})
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as stop, exit_on_sigterm(hard=False):
        os.kill(os.getpid(), signal.SIGTERM)
        while time.monotonic() - t0 < 30:  # waiting for a batch that never comes
            time.sleep(0.01)
    assert 0.4 < time.monotonic() - t0 < 10
    assert stop.value.code == EXIT_PREEMPTED and not trainer.saved
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no training step ended within" in last and "at step 6" in last and "ckpt_path=last" in last
    # a second SIGTERM does not wait for the grace period
    cb = Preemption(str(tmp_path / "last.ckpt"), grace_s=30)
    cb.on_fit_start(trainer, None)
    cb.on_train_start(trainer, None)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    with pytest.raises(Preempted):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert cb._timer.finished.is_set()  # no late re-signal once stopped


# ------------------------------------------------------------------------------------- run names
@pytest.mark.parametrize("shards, name", [
    ("data/toy/train", "toy"),
    ("data/curate_demo/export/train", "curate_demo"),
    ("/data/cultwin/train/shard-{000000..000099}.tar", "cultwin"),
    (["/scratch/my run/val/", "/other/train"], "my_run"),
    ("train", "run"),
])
def test_task_name_follows_the_shard_folder(shards, name):
    from cultureclip.resolvers import task_name
    assert task_name(shards) == name


def test_composed_run_name_follows_the_data(tmp_path):
    from hydra import compose, initialize_config_dir
    from cultureclip import resolvers
    resolvers.register()
    conf = Path(__file__).resolve().parents[1] / "cultureclip" / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        toy = compose("train")
        curated = compose("train", overrides=["data=cultwin", "data.train_shards=data/curate_demo/export/train",
                                               "data.val_shards=data/curate_demo/export/val"])
        named = compose("train", overrides=["data=cultwin", "data.train_shards=x/train", "data.val_shards=x/val",
                                             "run_name=mine"])
        smoke = compose("train", overrides=["+experiment=smoke"])
    assert toy.run_name == "toy-cultureclip-s0"
    assert curated.run_name == "curate_demo-cultureclip-s0"  # not the toy run's folder
    assert named.run_name == "mine" and smoke.task_name == "smoke"


def test_fresh_run_over_checkpoints_is_one_line_naming_folder_and_ways_forward(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    rundir.check_fresh_or_resuming(tmp_path, None)  # no checkpoint yet: fine
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    rundir.check_fresh_or_resuming(tmp_path, tmp_path / "checkpoints" / "last.ckpt")  # resuming: fine
    with pytest.raises(rundir.RunDirExists) as err:
        rundir.check_fresh_or_resuming(tmp_path, None)
    msg = str(err.value)
    assert isinstance(err.value, FileExistsError) and "\n" not in msg
    assert str(tmp_path) in msg and "run_name=" in msg and "ckpt_path=last" in msg


@pytest.mark.slow  # the training CLI in a subprocess: seconds of start-up
def test_run_name_clash_on_the_command_line_is_one_line_without_traceback(tmp_path):
    run_dir = tmp_path / "outputs" / "toy-cultureclip-s0"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    env = {k: v for k, v in os.environ.items() if k != "CULTURECLIP_TRACEBACK"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-m", "cultureclip.train", f"paths.root_dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith("error: ") and str(run_dir) in lines[-1], lines
    assert "run_name=" in lines[-1] and "ckpt_path=last" in lines[-1]
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == b"not a checkpoint"
