"""The README and the docs: every relative link and anchor resolves (fast), and the README's own
quickstart and curation commands run in order in a fresh folder (slow), read from the README itself so
that the two cannot drift apart.

A fenced block runs when the line before it is ``<!-- readme-test -->``; its commands run in README
order, ``python`` as this interpreter and ``tools/`` from this checkout. Training commands get
``trainer.max_steps`` appended (the documented command, shortened) so the slow set stays minutes.
"""
from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test -->"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FAST_TRAIN = "trainer.max_steps=3"


# ------------------------------------------------------------------------------------------- links
def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip()).lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not re.match(r"#{1,6} ", line):
            continue
        slug = github_anchor(line.lstrip("#"))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not bad, f"{page.name}: " + "; ".join(bad)


def test_anchor_slugs_follow_github():
    assert github_anchor("Twins (`eval=twins`)") == "twins-evaltwins"
    assert github_anchor("What differs from the reference code, and why") == "what-differs-from-the-reference-code-and-why"


# ---------------------------------------------------------------------------------------- commands
def readme_commands(text: str) -> list[str]:
    """The commands of the marked fenced blocks, in order: continuation lines joined, comments dropped."""
    commands = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        assert lines[i + 1].startswith("```"), f"README line {i + 1}: {MARK} must come right before a fenced block"
        block = []
        for body in lines[i + 2:]:
            if body.startswith("```"):
                break
            block.append(body)
        joined = re.sub(r"\\\n\s*", " ", "\n".join(block))
        for cmd in joined.splitlines():
            cmd = re.sub(r"\s+#.*$", "", cmd).strip()  # a trailing comment (never inside our quoted args)
            if cmd and not cmd.startswith("#"):
                commands.append(cmd)
    return commands


def test_the_readme_marks_the_documented_sequence():
    cmds = readme_commands((REPO / "README.md").read_text())
    kinds = [next((k for k in ("cultureclip.train", "cultureclip.curate", "cultureclip.evaluate", "zeroshot_classify")
                   if k in c), c) for c in cmds]
    # demo, curate demo, train on its shards, evaluate the result, zero-shot script
    assert [k for k in kinds if k in ("cultureclip.train", "cultureclip.curate", "cultureclip.evaluate",
                                      "zeroshot_classify")][:5] == [
        "cultureclip.train", "cultureclip.curate", "cultureclip.train", "cultureclip.evaluate", "zeroshot_classify"]


def as_run(cmd: str) -> list[str]:
    argv = shlex.split(cmd)
    if argv[0] == "python":
        argv[0] = sys.executable
    argv = [str(REPO / a) if a.startswith("tools/") else a for a in argv]
    if argv[1:3] == ["-m", "cultureclip.train"]:
        argv.append(FAST_TRAIN)
    return argv


@pytest.mark.slow  # the README's commands, end to end on the CPU: a few minutes
def test_readme_commands_run_in_order_in_a_fresh_folder(tmp_path):
    cmds = readme_commands((REPO / "README.md").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CULTURECLIP_", "OPENAI_API_KEY"))}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    outputs = []
    for cmd in cmds:
        if not re.match(r"(python|printf|mkdir|ls) ", cmd):
            pytest.fail(f"README command {cmd!r}: the test knows how to run python, printf, mkdir and ls only")
        if cmd.startswith("python"):
            done = subprocess.run(as_run(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        else:
            done = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"README command failed: {cmd}\n{out[-3000:]}"
        assert "Traceback" not in out, f"{cmd}\n{out[-3000:]}"
        outputs.append((cmd, out))
    everything = "\n".join(out for _, out in outputs)
    assert "faiss.loader" not in everything and "HTTP Request:" not in everything  # quiet third-party logs
    curate_out = next(out for cmd, out in outputs if "cultureclip.curate" in cmd)
    assert curate_out.count("is not set") <= 1  # the missing API-key variable: once per run
    # the curated run trained into its own folder, next to the toy run, and was evaluated and used
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir() if (p / "metrics.json").is_file())
    assert "toy-cultureclip-s0" in runs and "curate_demo-cultureclip-s0" in runs, runs
    assert list((tmp_path / "outputs" / "eval").rglob("*twins*.json")), "evaluate wrote no twins result"
    predictions = [p for p in tmp_path.rglob("*.csv") if "predictions" in p.name]
    assert predictions and len(list(csv.DictReader(predictions[0].open()))) > 0
