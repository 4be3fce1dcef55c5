#!/usr/bin/env python
"""GPU evidence in one prepared, self-checking run: training MFU and speed against open_clip, render stage
overhead against bare diffusers, embedding and FAISS throughput. Random weights at the real sizes throughout
(timing needs no trained weights, and nothing is downloaded).

    make gpu-check                                   # = python benchmarks/gpu_check.py --out gpu_check
    python benchmarks/gpu_check.py --out gpu_check --sections train render
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check   # tiny sizes on a CPU, seconds (tests)

Each section (``train``, ``compile``: the training rows with torch.compile, ``render``, ``eval``) runs in its
own process under a time budget (killed at the budget, its finished rows kept); every finished row is written to ``gpu_check.json`` and ``gpu_check.md``
at once, so a run cut short still leaves its figures. A row that fails is recorded with its error and the
others still run. docs/benchmarks.md explains every figure and the targets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

SECTIONS = ("train", "compile", "render", "eval")  # compile: the training rows with torch.compile
# seconds; with process start-ups the total stays under 8 minutes. What a section leaves goes to the next.
BUDGETS = {"train": 170, "compile": 105, "render": 125, "eval": 45}
DRY_BUDGETS = {"train": 120, "compile": 10, "render": 60, "eval": 60}
TOTAL_BUDGET = 455
GRACE_S = 10  # a section process past its budget by this much is killed
PARTIAL = "partial"  # the rows of each section as JSON lines, appended as they finish
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
TARGETS = {"mfu_lora_b32": 0.45, "ratio_full_twin_loss": 1.3, "render_overhead": 0.03}


# ------------------------------------------------------------------ self-checks (pure, unit-tested)
def check_finite(losses: Optional[list]) -> dict:
    """Every recorded loss is finite (no NaN/inf)."""
    if not losses:
        return {"ok": False, "detail": "no loss recorded"}
    bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
    return {"ok": not bad, "detail": f"{len(bad)} of {len(losses)} steps non-finite" + (
        f" (first: step {bad[0]})" if bad else "")}


def check_loss_falls(losses: Optional[list], warmup: int) -> dict:
    """The mean loss of the last third of the timed steps is below that of their first third."""
    timed = list(losses or [])[warmup:]
    if len(timed) < 3:
        return {"ok": False, "detail": f"{len(timed)} timed losses, need >= 3"}
    k = len(timed) // 3
    first, last = sum(timed[:k]) / k, sum(timed[-k:]) / k
    return {"ok": last < first, "detail": f"mean of the first {k} timed steps {first:.4f}, of the last {k} {last:.4f}"}


def check_memory_flat(memory_mib: Optional[list], warmup: int, cuda: bool) -> dict:
    """Memory in use after the last timed step is at most that after the first timed step plus a tolerance
    (1% or 16 MiB of CUDA allocations; 10% or 64 MiB of a CPU process's resident set, which is noisier)."""
    timed = list(memory_mib or [])[warmup:]
    if len(timed) < 2:
        return {"ok": False, "detail": f"{len(timed)} timed memory readings, need >= 2"}
    frac, floor = (0.01, 16.0) if cuda else (0.10, 64.0)
    growth, allowed = timed[-1] - timed[0], max(floor, frac * timed[0])
    return {"ok": growth <= allowed, "detail": f"{timed[0]:.0f} -> {timed[-1]:.0f} MiB over {len(timed)} timed steps "
                                              f"(allowed growth {allowed:.0f} MiB)"}


# ------------------------------------------------------------------ results on disk
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader (or a kill) never sees half a file


def load_state(out: Path) -> dict:
    path = out / JSON_NAME
    return json.loads(path.read_text()) if path.is_file() else {"sections": {}}


def publish(out: Path, state: dict) -> None:
    """Write ``gpu_check.json`` and ``gpu_check.md`` from ``state``."""
    from gpu_report import format_markdown  # beside this script
    state["written_at"] = _utc_now()
    _write_atomic(out / JSON_NAME, json.dumps(state, indent=1, default=str))
    try:
        md = format_markdown(state)
    except Exception:  # a formatting bug must not stop the measurements: the markdown says what broke
        md = f"# GPU check\n\nThe report could not be formatted; {JSON_NAME} holds every figure.\n\n```\n" \
             f"{traceback.format_exc()[-3000:]}```\n"
    _write_atomic(out / MD_NAME, md)


def keep_previous(out: Path) -> Optional[Path]:
    """Rename an earlier run's ``gpu_check.json``/``.md`` in ``out`` after its start time, so a new run never
    overwrites figures already taken; returns the renamed JSON."""
    old = out / JSON_NAME
    if not old.is_file():
        return None
    try:
        stamp = json.loads(old.read_text()).get("started", "")
    except json.JSONDecodeError:
        stamp = ""
    tag = "".join(c for c in stamp if c.isdigit())[:14] or str(int(old.stat().st_mtime))
    for name in (JSON_NAME, MD_NAME):
        src = out / name
        if src.is_file():
            os.replace(src, out / f"{src.stem}-{tag}{src.suffix}")
    return out / f"{old.stem}-{tag}{old.suffix}"


def read_rows(out: Path, section: str) -> list[dict]:
    path = out / PARTIAL / f"{section}.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed process may be cut
            continue
    return rows


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------ section processes
class Section:
    """What a section's code gets: its deadline, where rows go, and a guarded way to run each row."""

    def __init__(self, name: str, out: Path, deadline: float, args: argparse.Namespace):
        self.name, self.out, self.args = name, out, args
        self.deadline = deadline  # time.time(): the parent's clock, so a child's start-up counts too
        self.rows_path = out / PARTIAL / f"{name}.jsonl"
        self.rows_path.parent.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def emit(self, row: dict) -> None:
        """Append a finished row and republish the results, so a kill loses nothing finished."""
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        state = load_state(self.out)
        sec = state["sections"].setdefault(self.name, {})
        sec.update(status="running", rows=read_rows(self.out, self.name))
        publish(self.out, state)

    def attempt(self, name: str, fn: Callable[[], dict], need_s: float, **info) -> dict:
        """Run ``fn()`` as row ``name`` unless fewer than ``need_s`` seconds are left; a failure is a row too."""
        row = {"name": name, **info}
        if self.remaining() < need_s:
            row.update(status="skipped", reason=f"section time budget: {self.remaining():.0f} s left, the row "
                                                  f"needs about {need_s:.0f} s")
        else:
            t0 = time.monotonic()
            try:
                row["status"] = "ok"
                row.update(fn())  # may set its own status ("failed" with an error, its other figures kept)
            except Exception as exc:  # reported as the row's result; the other rows still run
                row.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000],
                           traceback=traceback.format_exc()[-4000:])
                _free_cuda()
            row["wall_s"] = round(time.monotonic() - t0, 2)
        self.emit(row)
        return row


def _free_cuda() -> None:
    import gc
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # a poisoned CUDA context: the next row reports its own error
        pass


def run_section_here(name: str, out: Path, deadline: float, args: argparse.Namespace) -> None:
    """The section process: run section ``name``'s rows (modules beside this script) until ``deadline``."""
    sec = Section(name, out, deadline, args)
    if name in ("train", "compile"):
        from gpu_train import run_train
        run_train(sec, compiled=name == "compile")
    elif name == "render":
        from gpu_render import run_render
        run_render(sec)
    elif name == "eval":
        from gpu_eval import run_eval
        run_eval(sec)
    else:
        raise ValueError(f"unknown section {name!r}; known: {SECTIONS}")


def run_section_process(name: str, out: Path, budget_s: float, args: argparse.Namespace) -> dict:
    """Run a section in a child process, killed ``GRACE_S`` after its budget; returns its summary."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out),
           "--section-deadline", repr(time.time() + budget_s)] + (["--dry-run"] if args.dry_run else [])
    log = out / PARTIAL / f"{name}.log"
    t0 = time.monotonic()
    with open(log, "w") as logf:
        # own process group: a kill also stops the section's data-loader workers
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": _pythonpath()})
        try:
            rc, killed = proc.wait(timeout=budget_s + GRACE_S), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, killed = proc.wait(), True
    rows = read_rows(out, name)
    summary = {"status": "killed" if killed else "done" if rc == 0 else "failed", "budget_s": round(budget_s),
               "seconds": round(time.monotonic() - t0, 1), "exit_code": rc, "rows": rows, "log": str(log)}
    if killed:
        summary["error"] = f"killed after its time budget of {budget_s:.0f} s (+{GRACE_S} s); finished rows kept"
    elif rc != 0:
        summary["error"] = log.read_text()[-3000:]
    return summary


def run_section_in_process(name: str, out: Path, budget_s: float, args: argparse.Namespace) -> dict:
    """:func:`run_section_process` without the process: same summary, an exception is the section's error."""
    t0, summary = time.monotonic(), {"budget_s": round(budget_s), "exit_code": None, "log": None}
    try:
        run_section_here(name, out, time.time() + budget_s, args)
        summary["status"] = "done"
    except Exception:  # the section's failure is reported; the next section still runs
        summary.update(status="failed", error=traceback.format_exc()[-3000:])
    summary.update(seconds=round(time.monotonic() - t0, 1), rows=read_rows(out, name))
    return summary


def _pythonpath() -> str:
    """This script's folder (its helper modules) and the repository (this tree's cultureclip) first."""
    here = Path(__file__).resolve().parent
    parts = [str(here), str(here.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.md and partial/")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever device there is (tests)")
    p.add_argument("--total-budget", type=float, default=None,
                   help=f"seconds for all sections (default {TOTAL_BUDGET}; dry run: the sum of its section budgets)")
    p.add_argument("--budget", nargs=2, action="append", metavar=("SECTION", "SECONDS"), default=[],
                   help="override one section's budget, e.g. --budget render 60")
    p.add_argument("--in-process", action="store_true",
                   help="run the sections in this process (tests, debugging): faster to start, but a section "
                        "past its budget is not killed (rows still stop starting once it is spent)")
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one section here
    p.add_argument("--section-deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.section:
        run_section_here(args.section, out, args.section_deadline, args)
        return 0

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cuda" and not args.dry_run:
        print("no CUDA device: the full check needs a GPU (use --dry-run for the tiny CPU version)", file=sys.stderr)
        return 2
    budgets = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
    for name, seconds in args.budget:
        if name not in SECTIONS:
            p.error(f"--budget: unknown section {name!r}; known: {SECTIONS}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            p.error(f"--budget {name}: seconds must be a number, got {seconds!r}")
    total = args.total_budget or (sum(budgets.values()) if args.dry_run else TOTAL_BUDGET)
    (out / PARTIAL).mkdir(parents=True, exist_ok=True)
    keep_previous(out)
    for name in args.sections:
        (out / PARTIAL / f"{name}.jsonl").unlink(missing_ok=True)
    start = time.monotonic()
    from gpu_report import environment
    state = {"started": _utc_now(), "dry_run": args.dry_run, "targets": TARGETS, "total_budget_s": total,
             "command": " ".join(["python", "benchmarks/gpu_check.py"] + list(sys.argv[1:] if argv is None else argv)),
             "environment": environment(device), "sections": {}}
    publish(out, state)
    spare = 0.0  # what earlier sections left of their budgets goes to the later ones
    for name in args.sections:
        left = total - (time.monotonic() - start)
        budget = min(budgets[name] + spare, left - GRACE_S)
        if budget < 5:
            state["sections"][name] = {"status": "skipped", "rows": [],
                                       "error": f"total time budget of {total:.0f} s spent before this section"}
            publish(out, state)
            continue
        state["sections"][name] = {"status": "running", "budget_s": round(budget), "rows": []}
        publish(out, state)
        summary = run_section_in_process(name, out, budget, args) if args.in_process else \
            run_section_process(name, out, budget, args)
        spare = max(0.0, budget - summary["seconds"])
        state = {**load_state(out), **{k: state[k] for k in state if k != "sections"}}
        state["sections"][name] = summary
        publish(out, state)
        print(f"{name}: {summary['status']} in {summary['seconds']:.0f} s, "
              f"{sum(r.get('status') == 'ok' for r in summary['rows'])}/{len(summary['rows'])} rows ok", flush=True)
    state["total_s"] = round(time.monotonic() - start, 1)
    publish(out, state)
    print(f"wrote {out / JSON_NAME} and {out / MD_NAME} ({state['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    # as the section processes get it (_pythonpath): helpers beside this script, then this tree's cultureclip
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
    sys.exit(main())
