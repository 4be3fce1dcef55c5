"""Interrupted runs through the training CLI: SIGTERM and kill -9 at a random step, then resume
with ckpt_path=last, end with the model and the metrics log of an uninterrupted run; a full disk,
a missing last.ckpt and a second training into the same run directory fail clearly and lose nothing."""
import csv
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import load_file

import cultureclip
from cultureclip.train import train

CONF = Path(cultureclip.__file__).parent / "conf"

RUN = "smoke-cultureclip-s0"
MAX_STEPS = 8
# 3 batches of 8 pairs per epoch: an 8-step run crosses two epoch boundaries
SHORT_EPOCHS = ["+data.train_pairs_per_epoch=24", "trainer.max_epochs=100", f"trainer.max_steps={MAX_STEPS}",
                "callbacks.step_checkpoint.every_n_train_steps=1"]


@pytest.fixture(scope="session")
def toy_root(toy_shards):
    """The data dir holding the session's toy set (``toy/train``, ``toy/val``): read only."""
    return toy_shards.parent


def cli(toy_root, out, *overrides):
    return [sys.executable, "-m", "cultureclip.train", "+experiment=smoke", "callbacks.progress_bar=null",
            f"paths.data_dir={toy_root}", f"paths.output_dir={out}", *overrides]


def run(cmd, cwd, **kwargs):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, **kwargs)


def last_error_line(stderr: str) -> str:
    """The exception line: the last one before Hydra's closing hint."""
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line]
    return lines[-1]


def train_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.fixture(scope="module")
def reference(toy_root, tmp_path_factory):
    """An uninterrupted run with the same seed and settings."""
    out = tmp_path_factory.mktemp("reference")
    done = run(cli(toy_root, out, *SHORT_EPOCHS), cwd=out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN


def interrupt_and_resume(toy_root, out, sig) -> tuple[int, subprocess.CompletedProcess, str]:
    """Start a run, send ``sig`` once the checkpoint of a random step exists, then resume it."""
    at = random.Random().randint(1, MAX_STEPS - 2)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cli(toy_root, out, *SHORT_EPOCHS), cwd=out, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    marker = out / RUN / "checkpoints" / f"step{at:07d}.ckpt"
    last = out / RUN / "checkpoints" / "last.ckpt"  # written just after the step file: wait for both
    deadline = time.time() + 600
    while not (marker.exists() and last.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode != 0, f"the run ended before the signal (step {at}): {stderr[-2000:]}"
    resumed = run(cli(toy_root, out, *SHORT_EPOCHS, "ckpt_path=last"), cwd=out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return at, proc, stderr


def assert_same_as_reference(run_dir: Path, reference: Path, note: str) -> None:
    # every training step exactly once in the merged log, with the values of the uninterrupted run
    rows, ref_rows = train_rows(run_dir), train_rows(reference)
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS)), note
    for r, ref in zip(rows, ref_rows):
        assert float(r["train/loss"]) == pytest.approx(float(ref["train/loss"]), abs=1e-5), (note, r["step"])
    # the final model equals the uninterrupted one within float noise (same ops, same order on the CPU)
    got = load_file(run_dir / "model" / "open_clip_model.safetensors")
    ref = load_file(reference / "model" / "open_clip_model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5, msg=f"{note}: {k}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == MAX_STEPS
    # "before" was measured by the first attempt and kept by the resumed one
    assert metrics["before"] == json.loads((reference / "metrics.json").read_text())["before"] != {}


def make_cfg(overrides, run_dir, data_dir):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["+experiment=smoke", *overrides])
    with open_dict(cfg):
        cfg.paths.run_dir, cfg.paths.data_dir = str(run_dir), str(data_dir)
        cfg.callbacks.pop("progress_bar", None)
    return cfg


@pytest.mark.slow  # two trainings (~15 s); the fast suite keeps the pipeline-level resume tests
@pytest.mark.parametrize("resume_at,workers", [(4, 0), (3, 2)])
def test_resume_from_a_mid_run_checkpoint_is_exact(toy_root, tmp_path, resume_at, workers):
    # in-process: a full run's checkpoint of step `resume_at` stands for the last.ckpt of a killed run,
    # and its whole log for that run's log (which went on past the checkpoint)
    common = [*SHORT_EPOCHS, f"data.num_workers={workers}", "trainer.limit_val_batches=1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(make_cfg(common, full, toy_root))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / f"step{resume_at:07d}.ckpt", resumed / "checkpoints" / "last.ckpt")
    shutil.copytree(full / "csv", resumed / "csv")
    shutil.copy(full / "before_metrics.json", resumed)
    record, objs = train(make_cfg([*common, "ckpt_path=last"], resumed, toy_root))
    assert objs["trainer"].global_step == MAX_STEPS
    assert record["before"] == json.loads((full / "before_metrics.json").read_text()) != {}
    got = load_file(resumed / "model" / "open_clip_model.safetensors")
    ref = load_file(full / "model" / "open_clip_model.safetensors")
    for k in ref:  # same batches, same augmentations, same order: bitwise on the CPU
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)
    rows, ref_rows = train_rows(resumed), train_rows(full)
    assert [int(r["step"]) for r in rows] == list(range(MAX_STEPS))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref_rows]
    assert (resumed / "csv" / "metrics.attempt-1.csv").is_file()
    # the resumed attempt's config went beside the first one's, not over it
    assert (resumed / ".hydra" / "resume-1" / "config.yaml").is_file()


@pytest.mark.slow
def test_sigterm_at_a_random_step_saves_then_resume_is_exact(toy_root, tmp_path, reference):
    at, proc, stderr = interrupt_and_resume(toy_root, tmp_path, signal.SIGTERM)
    note = f"SIGTERM after step {at}"
    assert proc.returncode == 143, (note, stderr[-3000:])
    last_line = stderr.strip().splitlines()[-1]
    assert "pre-empted (SIGTERM) at step" in last_line and "resume with ckpt_path=last" in last_line, last_line
    stopped_at = int(last_line.split("at step ")[1].split(":")[0])
    assert at <= stopped_at < MAX_STEPS, note
    # the pre-emption checkpoint holds exactly the step the message names
    first = sorted((tmp_path / RUN / "csv").glob("metrics.attempt-*.csv"))
    assert len(first) == 1
    assert_same_as_reference(tmp_path / RUN, reference, note)


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_exact(toy_root, tmp_path, reference):
    at, proc, stderr = interrupt_and_resume(toy_root, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert not list((tmp_path / RUN / "checkpoints").glob(".*.tmp-*")), "a partial write survived the resume"
    assert_same_as_reference(tmp_path / RUN, reference, f"kill -9 after step {at}")


def _files(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_two_trainings_into_one_run_dir(toy_root, tmp_path):
    cmd = cli(toy_root, tmp_path, "trainer.max_steps=2", "logger=csv")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes[0] == 0 and codes[1] != 0, errs  # exactly one ran
    refused = errs[[p.returncode for p in procs].index(codes[1])]
    assert "is in use by pid" in refused and "run_name=" in refused, refused[-2000:]
    run_dir = tmp_path / RUN
    assert not (run_dir / ".lock").exists()  # released at exit
    before = _files(run_dir)
    assert ".hydra/config.yaml" in before
    # a later fresh run into the finished directory is refused and changes no file, Hydra's config included
    again = run(cli(toy_root, tmp_path, "trainer.max_steps=3"), cwd=tmp_path)
    assert again.returncode != 0 and "already holds checkpoints" in last_error_line(again.stderr)
    assert _files(run_dir) == before


@pytest.mark.slow  # the training CLI in a subprocess: seconds of start-up
def test_resume_without_last_ckpt_names_what_is_there(toy_root, tmp_path):
    ckpts = tmp_path / RUN / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"global_step": 2}, ckpts / "step0000002.ckpt")
    (ckpts / ".last.ckpt.tmp-12345").write_bytes(b"partial")
    done = run(cli(toy_root, tmp_path, "ckpt_path=last"), cwd=tmp_path)
    assert done.returncode == 1
    assert "last.ckpt does not exist" in done.stderr and "step0000002.ckpt" in done.stderr, done.stderr[-2000:]
    assert ".last.ckpt.tmp-12345" in done.stderr and "ckpt_path=<its path>" in done.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == [".last.ckpt.tmp-12345", "step0000002.ckpt"]
    assert not (tmp_path / RUN / "csv").exists()  # nothing trained


def _limit_file_size():
    # a real OS failure: writes past 1 MB fail with EFBIG (Python ignores SIGXFSZ, so no signal kills it)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


@pytest.mark.slow
def test_checkpoint_write_past_the_file_size_limit_fails_clearly(toy_root, tmp_path):
    done = run(cli(toy_root, tmp_path, "trainer.max_steps=2", "heldout=after_only"), cwd=tmp_path,
               preexec_fn=_limit_file_size)
    assert done.returncode == 1
    last = last_error_line(done.stderr)
    ckpts = tmp_path / RUN / "checkpoints"
    assert last.startswith("error: OSError: [Errno 27] File too large"), done.stderr[-3000:]
    assert "while writing checkpoint" in last and str(ckpts) in last
    assert not list(ckpts.glob(".*.tmp-*")) and not list(ckpts.glob("*.ckpt"))


@pytest.mark.slow
def test_sigterm_while_the_stream_delivers_nothing_stops_after_the_grace_period(toy_root, tmp_path):
    # a shard source that never sends a byte: the first training batch never comes
    cmd = cli(toy_root, tmp_path, "data.train_shards='pipe:sleep 60'", "+data.train_pairs_per_epoch=64",
              "callbacks.preemption.grace_s=3", "trainer.limit_val_batches=1")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    err = open(tmp_path / "stderr.txt", "w")  # not a pipe: the orphaned `sleep` would hold a pipe open
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
    before = tmp_path / RUN / "before_metrics.json"  # written just before fit() starts waiting for data
    deadline = time.time() + 600
    while not before.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(3)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert time.time() - t0 < 40
    last = stderr.strip().splitlines()[-1]
    assert "no training step ended within" in last and "this run wrote no checkpoint" in last, stderr[-3000:]
    assert not (tmp_path / RUN / ".lock").exists()
