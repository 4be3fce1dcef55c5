"""One rule for what reaches the user: a run that stops on its settings or inputs ends with one line
``error: <Type>: <message naming the key or file and what to do>``, exit status 1, no traceback, in every
entry point; ``CULTURECLIP_TRACEBACK=1`` shows the traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(args, cwd, **env):
    full = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **env}
    full.pop("CULTURECLIP_TRACEBACK", None) if "CULTURECLIP_TRACEBACK" not in env else None
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def assert_one_line(proc, *needles):
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), last


@pytest.mark.slow
def test_train_on_a_machine_without_a_gpu(tmp_path):
    args = ["-m", "cultureclip.train", "+experiment=cultwin", f"paths.output_dir={tmp_path / 'runs'}"]
    assert_one_line(run(args, tmp_path), "ConfigError", "no CUDA GPU", "add trainer=cpu")
    traced = run(args, tmp_path, CULTURECLIP_TRACEBACK="1")
    assert traced.returncode != 0 and "Traceback" in traced.stderr


@pytest.mark.slow
def test_train_into_a_run_dir_that_holds_checkpoints(tmp_path):
    ckpt = tmp_path / "runs" / "smoke-cultureclip-s0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"not touched")
    args = ["-m", "cultureclip.train", "+experiment=smoke", f"paths.output_dir={tmp_path / 'runs'}", "callbacks=none"]
    assert_one_line(run(args, tmp_path), "RunDirExists", "already holds checkpoints", "ckpt_path=last",
                    "run_name=")
    assert ckpt.read_bytes() == b"not touched"


@pytest.mark.slow
def test_evaluate_without_tasks(tmp_path):
    assert_one_line(run(["-m", "cultureclip.evaluate", "eval.tasks.twins=null"], tmp_path), "ValueError",
                    "no evaluation tasks", "eval=twins")


def test_tools_report_and_the_traceback_switch(tmp_path, capsys, monkeypatch):
    from cultureclip import errors
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    try:
        raise FileNotFoundError("input file 'x.jsonl' not found\nsecond line")
    except FileNotFoundError as exc:
        assert errors.report(exc) == 1
    assert capsys.readouterr().err == "error: FileNotFoundError: input file 'x.jsonl' not found second line\n"
    monkeypatch.setenv(errors.TRACEBACK_ENV, "1")
    with pytest.raises(FileNotFoundError):
        try:
            raise FileNotFoundError("y")
        except FileNotFoundError as exc:
            errors.report(exc)
