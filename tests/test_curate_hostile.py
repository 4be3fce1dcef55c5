"""Judge and export against a real local server that misbehaves inside valid answers: it quotes the
caller's key back, puts Markdown in its reason, answers booleans for scores. Everything a server says
is data: scrubbed, escaped, bounded, validated strictly."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("openai")
markdown_it = pytest.importorskip("markdown_it")

from test_curate_export import make_run  # noqa: E402

from cultureclip import schema  # noqa: E402
from cultureclip.curate.stages import export as E  # noqa: E402
from cultureclip.curate.stages import judge  # noqa: E402
from cultureclip.curate.runner import Store  # noqa: E402
from cultureclip.curate.registry import Context  # noqa: E402
from cultureclip.curate.backends.standin import KEY_PLACEHOLDER, Fault, StandinServer, schema_name  # noqa: E402

def judge_records(out):
    return sorted(Store(out / "judge", "judge").records(), key=lambda r: r[schema.REC_KEY])


def judge_errors(out):
    return {e[schema.REC_KEY]: e for e in Store(out / "judge", "judge").errors()}


SECRET = "sk-test-" + "fedcba9876543210" * 3
INJECTION = "|\n\n# INJECTED HEADING\n| forged | row |\n<script>alert(1)</script> [link](http://x) **bold**"


def judged_run(tmp_path, faults, monkeypatch, rule=None, fresh=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    made = make_run(out, judge=False) if fresh else None
    monkeypatch.setenv("CC_HOSTILE_KEY", SECRET)  # the key a real deployment reads from its environment
    with StandinServer(judge.standin_responders(), api_key=SECRET, faults=faults) as server:
        ctx = Context(out_dir=out, chat={"base_url": server.url, "model": "m", "api_key_env": "CC_HOSTILE_KEY",
                                         "max_attempts": 1, "timeout_s": 10, "concurrency": 4})
        report = judge.run({}, ctx)
    if not report.errors:  # export refuses a judge view with failed jobs (they are retried by the next run)
        E.run({"pairs_per_twin": None, "val_fraction": 0.0, "plots": False, "rule": rule or {}}, ctx)
    return out, made, report


def scores_patch(patch):
    return lambda i, body: Fault("patch", patch=patch) if schema_name(body) == judge.SCORES_SCHEMA else None


def test_a_key_echoed_in_answers_and_errors_is_written_nowhere(tmp_path, monkeypatch, caplog):
    caplog.set_level("DEBUG")

    def faults(i, body):  # the reason quotes the key; every 4th answer also breaks the schema with it
        if schema_name(body) != judge.SCORES_SCHEMA:
            return None
        bad = {schema.SCORE_AUTHENTICITY: f"key {KEY_PLACEHOLDER}"} if i % 4 == 0 else {}
        return Fault("patch", patch={schema.REASON: f"Bearer {KEY_PLACEHOLDER} looked fine", **bad})

    out, made, report = judged_run(tmp_path, faults, monkeypatch)
    assert report.ok and report.errors and report.errors_by_reason == {"schema_violation": report.errors}
    errors = judge_errors(out)
    assert errors and all("***" in e[schema.REC_MESSAGE] for e in errors.values())  # the echo was there, scrubbed
    echo_only = lambda i, body: (Fault("patch", patch={schema.REASON: f"Bearer {KEY_PLACEHOLDER} looked fine"})  # noqa: E731
                                 if schema_name(body) == judge.SCORES_SCHEMA else None)
    again = judged_run(tmp_path, echo_only, monkeypatch, fresh=False)[2]  # the failed ones retried, then export
    assert again.errors == 0 and again.ok == report.errors
    records = judge_records(out)
    assert records and all(r[schema.REASON] == "Bearer *** looked fine" for r in records)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "card.md" for p in written) and any("errors" in p.parts for p in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text


def test_markdown_in_the_reason_cannot_change_the_card(tmp_path, monkeypatch):
    """Every image fails the rule (a score of 1) and carries the injection: the card's rejected-images
    table keeps one row per image, seven cells each, and no heading, link, emphasis or HTML of its own."""
    out, made, report = judged_run(tmp_path, scores_patch({schema.SCORE_AUTHENTICITY: 1, schema.REASON: INJECTION}),
                                   monkeypatch)
    assert report.ok == len(made["renders"])
    text = (out / "export" / "card.md").read_text()
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(text)
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert not any("INJECTED" in h for h in headings), headings
    assert not any(t.type in ("html_block",) for t in tokens)
    inline = [c for t in tokens if t.type == "inline" for c in (t.children or [])]
    assert not any(c.type in ("html_inline", "link_open", "strong_open") for c in inline)
    card = json.loads((out / "export" / "card.json").read_text())
    n = len(card["gallery"])
    assert n == min(24, len(made["renders"]))
    rows = []  # the rejected-images table: the first table after its heading
    start = next(i for i, t in enumerate(tokens) if t.type == "inline" and t.content.startswith("Rejected images"))
    first = next(i for i in range(start, len(tokens)) if tokens[i].type == "table_open")
    for t in tokens[first:]:
        if t.type == "tr_open":
            rows.append(0)
        elif t.type in ("td_open", "th_open"):
            rows[-1] += 1
        elif t.type == "table_close":
            break
    assert rows == [7] * (n + 1)  # header + one row per rejected image, seven cells each
    assert "\n# INJECTED" not in text and "forged | row" not in text


def test_boolean_scores_are_schema_violations_not_ones(tmp_path, monkeypatch):
    """pydantic's lax mode reads true as 1: scores must be strict integers."""
    out, made, report = judged_run(tmp_path, scores_patch({schema.SCORE_AUTHENTICITY: True}), monkeypatch)
    assert report.ok == 0 and report.errors == len(made["renders"])
    assert report.errors_by_reason == {"schema_violation": len(made["renders"])}
    out2, _, report2 = judged_run(tmp_path / "b", scores_patch({schema.SCORE_AUTHENTICITY: 1}), monkeypatch)
    assert report2.ok == len(made["renders"])  # the integer 1 is a valid score
    assert all(type(r[schema.SCORE_AUTHENTICITY]) is int for r in judge_records(out2))


def test_a_bad_timeout_is_a_config_error_before_any_request(tmp_path):
    out = tmp_path / "run"
    make_run(out, judge=False)
    with StandinServer(judge.standin_responders()) as server:
        for key, value in (("timeout_s", -1), ("timeout_s", "soon"), ("max_tokens", 0), ("temperature", float("nan")),
                           ("concurrency", True)):
            ctx = Context(out_dir=out, chat={"base_url": server.url, "model": "m", key: value})
            with pytest.raises(ValueError, match=rf"chat setting {key} must be .* got .*fix chat\.{key}"):
                judge.run({}, ctx)
        assert server.requests == 0  # refused before asking: the server is not blamed


def test_disk_full_during_export_names_the_file(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, as `prlimit --fsize` sets): the shard write fails with EFBIG,
    and the command's last line names the file and the limit, with no traceback."""
    import resource
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    make_run(out)
    limit = 40_000  # bytes: the run's records fit, a shard of 16 image pairs does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "cultureclip.curate", "stage=export", f"out_dir={out}",
                           "export.plots=false", "export.val_fraction=0", "export.pairs_per_twin=null"],
                          cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(root)},
                          preexec_fn=cap, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: OSError: [Errno 27] File too large (a file-size limit, see ulimit -f) while "
                           f"writing shard {out}/"), last
    assert not (out / "export").exists()  # the half-written export was removed; nothing replaced


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_stops_in_two_seconds_and_the_rerun_matches(tmp_path, sig):
    """A real Ctrl-C (SIGINT) or SIGTERM to the curate command while its requests wait on a server that
    is slow (60 s) or says Retry-After 100: it exits within 2 s, keeps the judged records, and the same
    command then finishes with records equal to an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out, clean = tmp_path / "run", tmp_path / "clean" / "run"
    made = make_run(out, judge=False)
    (tmp_path / "clean").mkdir()
    make_run(clean, judge=False)
    stuck = lambda i, body: None if i < 12 else Fault("slow", delay_s=60) if i % 2 else Fault("429", retry_after=100)  # noqa: E731

    def command(url, where):
        return [sys.executable, "-m", "cultureclip.curate", "stage=judge", f"out_dir={where}", "judge=standin",
                f"chat.base_url={url}", "chat.timeout_s=100", "chat.concurrency=4", "judge.part_size=2"]

    env = {**os.environ, "PYTHONPATH": str(root)}
    with StandinServer(judge.standin_responders(), faults=stuck) as server:
        proc = subprocess.Popen(command(server.url, out), cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.requests < 16 and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # the stuck requests are in flight, the 429s wait out their Retry-After
        assert proc.poll() is None and server.requests >= 16
        start = time.monotonic()
        proc.send_signal(getattr(signal, sig))
        err = proc.communicate(timeout=30)[1]
        took = time.monotonic() - start
    assert took < 2.0, (took, err[-2000:])
    assert proc.returncode == (130 if sig == "SIGINT" else 143), err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"error: stopped by {sig}")
    done = judge_records(out)
    assert 0 < len(done) < len(made["renders"])
    with StandinServer(judge.standin_responders()) as server:  # the same command, the server healthy again
        rerun = subprocess.run(command(server.url, out), cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert server.by_schema[judge.SCORES_SCHEMA] == len(made["renders"]) - len(done)  # only what was missing
        ctx = Context(out_dir=clean, chat={"base_url": server.url, "model": "standin-judge"})
        judge.run({"part_size": 64}, ctx)
    Store(out / "judge", "judge").verify()
    assert judge_records(out) == judge_records(clean)
