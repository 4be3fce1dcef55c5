"""Every curate command the README and the curation guide document composes to the servers, models and
concurrency they say.

The commands are read from README.md and docs/curation.md themselves, composed with Hydra as the entry point does, and each chat
stage's effective settings (what its client would connect to) are compared with what the command line
and the README's `vllm serve` lines say."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from test_curate_app import compose_curate
from test_curate_export import make_run

from cultureclip.curate import app
from cultureclip.curate.stages import judge
from cultureclip.curate.stages import upstream as up
from cultureclip.curate.registry import Context

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "curation.md")  # the quickstart, and the guide with the real runs
CHAT_STAGES = ("concepts", "twins", "captions", "judge")
TEXT = ("Qwen/Qwen2.5-7B-Instruct", "http://localhost:8001/v1", 8)  # model, server, concurrency
VLM = ("Qwen/Qwen2.5-VL-7B-Instruct", "http://localhost:8000/v1", 64)
STANDIN_URL = "http://standin.invalid/v1"  # the app sets the started stand-in's URL here


def readme_commands() -> list[list[str]]:
    """The curate commands of the pages' code blocks, as argument lists (continuations joined)."""
    blocks, fenced = [], None
    for line in "".join(page.read_text() for page in PAGES).splitlines(keepends=True):
        if line.startswith("```"):
            fenced = [] if fenced is None else blocks.append("".join(fenced))
        elif fenced is not None:
            fenced.append(line)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"python -m cultureclip\.curate\b(.*)", line)
            if not m:
                continue
            args = m.group(1).split("#")[0].split("&")[0]
            args = args.replace("$RUN", "/tmp/run").replace("$i", "0").replace("$SLURM_ARRAY_TASK_ID", "0")
            out.append(shlex.split(args))
    return out


def served_models() -> dict[str, str]:
    """model -> port, from the pages' `vllm serve` lines."""
    return {m: p for m, p in re.findall(r"vllm serve (\S+) --port (\d+)", "".join(page.read_text() for page in PAGES))}


def expected(stage: str, args: list[str], cfg: dict) -> tuple:
    model, url, conc = VLM if stage == "judge" else TEXT
    if cfg["standin"]:  # the stand-in's URL is set when the app starts it
        url = STANDIN_URL  # and the stand-in stage files' own model and concurrency
        model, conc = cfg[stage]["chat"]["model"], cfg[stage]["chat"].get("concurrency", 8)
    given = dict(a.split("=", 1) for a in args if "=" in a)
    for key in (f"{stage}.chat.", "chat."):  # the run-wide override wins over the stage's own
        model = given.get(key + "model", model)
        url = given.get(key + "base_url", url)
        conc = int(given.get(key + "concurrency", conc))
    return model, url, conc


def effective(stage: str, cfg: dict) -> tuple:
    run_chat = dict(cfg["chat"])
    if cfg["standin"]:
        run_chat["base_url"] = STANDIN_URL
    ctx = Context(out_dir=Path(cfg["out_dir"]), chat=run_chat)
    if stage == "judge":
        c = judge.chat_config(cfg["judge"], ctx)
        return c.model, c.base_url, c.concurrency
    s = up.chat_settings(cfg[stage], ctx)
    return s["model"], s["base_url"], int(s.get("concurrency", 8))


def test_readme_commands_reach_the_servers_they_name(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 8 and any("chat.base_url=http://gpu-node:8000/v1" in c for c in commands)
    ports = served_models()
    assert ports == {VLM[0]: "8000", TEXT[0]: "8001"}  # the README starts one server per model
    assert VLM[1].endswith(f":{ports[VLM[0]]}/v1") and TEXT[1].endswith(f":{ports[TEXT[0]]}/v1")
    checked = 0
    for args in commands:
        cfg = compose_curate([*args, f"paths.root_dir={tmp_path}"])
        for stage in app.stage_list(cfg["stage"], cfg):
            if stage in CHAT_STAGES:
                assert effective(stage, cfg) == expected(stage, args, cfg), (args, stage)
                checked += 1
    assert checked >= 8


def test_run_wide_chat_override_wins_over_the_judge_file(tmp_path):
    """`chat.base_url=...` on the command line reaches the judge (its file sets its own base_url), and
    `judge.chat.base_url=...` reaches the judge alone."""
    cfg = compose_curate(["stage=judge", "chat.base_url=http://gpu-node:8000/v1", "chat.concurrency=64",
                          "chat.timeout_s=5", f"paths.root_dir={tmp_path}"])
    c = judge.chat_config(cfg["judge"], Context(out_dir=tmp_path, chat=cfg["chat"]))
    assert (c.base_url, c.concurrency, c.timeout_s, c.model) == ("http://gpu-node:8000/v1", 64, 5, VLM[0])
    cfg = compose_curate(["judge.chat.base_url=http://vlm:9000/v1", f"paths.root_dir={tmp_path}"])
    ctx = Context(out_dir=tmp_path, chat=cfg["chat"])
    assert judge.chat_config(cfg["judge"], ctx).base_url == "http://vlm:9000/v1"
    assert up.chat_settings(cfg["captions"], ctx)["base_url"] == TEXT[1]


def test_standin_wins_over_the_judge_files_server(tmp_path):
    """judge=qwen25_vl standin=true: the judge's requests go to the stand-in, not to localhost:8000."""
    out = tmp_path / "run"
    made = make_run(out, judge=False)
    cfg = compose_curate(["judge=qwen25_vl", "standin=true", "stage=judge", f"out_dir={out}",
                          "judge.chat.max_attempts=1", "judge.chat.timeout_s=5"])
    reports = app.run(cfg, echo=lambda line: None)
    assert reports[0].ok == len(made["renders"]) and reports[0].errors == 0
