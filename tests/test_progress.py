"""Progress you can read: plain lines with rate and ETA off a terminal, a rich bar on one, the hooks in
the curation runner, the text embedding and the evaluation image batches."""
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cultureclip import progress, schema
from cultureclip.curate.runner import Job, Outcome, Store, run_stage


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(progress.time, "monotonic", c)
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    monkeypatch.delenv(progress.EVERY_ENV, raising=False)
    return c


def test_plain_lines_every_n_seconds_with_rate_eta_and_a_summary(clock):
    out = io.StringIO()  # not a terminal: plain lines
    with progress.Progress("render 00000of00001", total=100, unit="jobs", every_s=10, stream=out) as bar:
        assert bar.mode == "lines"
        for _ in range(20):  # 20 jobs in 5 s: below the 10 s interval, no line yet
            clock.t += 0.25
            bar.update()
        assert out.getvalue() == ""
        for i in range(20):  # 20 more in the next 5 s, one of them an error
            clock.t += 0.25
            bar.update(errors=int(i == 3))
    lines = out.getvalue().splitlines()
    # reference: 40 done in 10 s -> 4 jobs/s, 60 left -> 15 s
    assert lines[0] == "render 00000of00001: 40/100 jobs (40%), 4 jobs/s, elapsed 0:00:10, ETA 0:00:15, 1 errors"
    assert lines[-1] == "render 00000of00001 done: 40 jobs in 0:00:10, 4 jobs/s, 1 errors"
    assert len(lines) == 2


def test_unknown_total_has_no_eta_and_inner_loops_stay_quiet_unless_slow(clock):
    out = io.StringIO()
    with progress.Progress("texts", unit="texts", every_s=1, summary=False, stream=out) as bar:
        clock.t += 2
        bar.update(6)
    assert out.getvalue().splitlines() == ["texts: 6 texts, 3 texts/s, elapsed 0:00:02, 0 errors",
                                           "texts done: 6 texts in 0:00:02, 3 texts/s, 0 errors"]
    quiet = io.StringIO()
    assert list(progress.track(range(3), "quick", summary=False, stream=quiet, every_s=60)) == [0, 1, 2]
    assert quiet.getvalue() == ""  # a quick inner loop writes nothing


def test_environment_chooses_mode_and_interval(clock, monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "off")
    out = io.StringIO()
    with progress.Progress("x", total=2, stream=out) as bar:
        bar.update(2)
    assert out.getvalue() == ""
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    with progress.Progress("x", total=2, stream=out, every_s=60) as bar:  # the environment wins
        bar.update()
    assert out.getvalue().startswith("x: 1/2 items (50%)")
    monkeypatch.setenv(progress.MODE_ENV, "fancy")
    with pytest.raises(ValueError, match="CULTURECLIP_PROGRESS='fancy'"):
        progress.Progress("x", stream=out)


def test_bar_mode_draws_rate_and_eta_and_nested_bars_share_one_display(monkeypatch):
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    out = io.StringIO()
    with progress.Progress("outer", total=4, unit="jobs", stream=out, mode="bar") as outer:
        inner_items = list(progress.track(range(3), "inner", unit="texts", mode="bar", summary=False))
        assert inner_items == [0, 1, 2]
        for _ in range(4):
            outer.update()
    text = out.getvalue()
    assert progress._live["progress"] is None  # the display is stopped with its last user
    assert "outer" in text and "4/4" in text and "jobs/s" in text and "ETA" in text
    assert "inner" not in text.splitlines()[-1]  # an inner bar without summary is removed when done


def test_curation_runner_reports_progress_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    jobs = [Job(inputs={"i": i}, settings={}) for i in range(5)]

    def process(it):
        for job in it:
            if job["i"] == 2:
                yield Outcome(job[schema.REC_KEY], error="bad", message="no")
            else:
                yield Outcome(job[schema.REC_KEY], record={"i": job["i"]})

    run_stage(Store(tmp_path / "t", "t"), jobs, process, log_every=0)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("t 00000of00001")]
    assert [re.match(r"t 00000of00001: (\d)/5 jobs", line).group(1) for line in lines[:-1]] == list("12345")
    errors = [int(re.search(r"(\d+) errors$", line).group(1)) for line in lines]
    assert errors == sorted(errors) and errors[0] in (0, 1) and errors[-1] == 1  # counted once, as it came
    assert lines[-1].startswith("t 00000of00001 done: 5 jobs")


def test_text_embedding_and_image_batches_report_progress(capsys, monkeypatch):
    monkeypatch.setenv(progress.MODE_ENV, "lines")
    monkeypatch.setenv(progress.EVERY_ENV, "0")
    from cultureclip.curate.backends import embeddings
    embeddings.embed(["Kimono", "Hanbok", "Ao dai"], {"backend": "ngram", "dim": 64}, desc="dedup: embedding")
    from cultureclip.eval.imagesets import ImageBatches
    from PIL import Image
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(5)]
    assert sum(len(i) for i, _ in ImageBatches(images, None, batch_size=2, progress="decoding").indexed()) == 5
    err = capsys.readouterr().err.splitlines()
    assert "dedup: embedding: 3/3 texts (100%)" in "\n".join(err)
    assert any(line.startswith("decoding: 3/3 batches (100%)") for line in err), err


@pytest.mark.slow  # a real terminal (pty) running a curation stage: seconds of start-up
def test_a_curation_stage_on_a_terminal_shows_rate_and_eta(tmp_path):
    pty = pytest.importorskip("pty")
    code = ("import time\nfrom cultureclip import schema\n"
            "from cultureclip.curate.runner import Job, Outcome, Store, run_stage\n"
            "jobs = [Job(inputs={'i': i}, settings={}) for i in range(40)]\n"
            "def work(it):\n    for j in it:\n        time.sleep(0.05)\n"
            "        yield Outcome(j[schema.REC_KEY], record={'i': j['i']})\n"
            f"run_stage(Store({str(tmp_path / 's')!r}, 'render'), jobs, work)\n")
    env = {k: v for k, v in os.environ.items() if k not in (progress.MODE_ENV, "TERM")}
    env.update(TERM="xterm-256color", COLUMNS="160", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert re.search(r"render 00000of00001.*\d+/40.*jobs/s.*ETA", screen), screen[-2000:]


def test_plain_lines_keep_coming_while_no_item_finishes(monkeypatch):
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    out = io.StringIO()
    with progress.Progress("judge 00000of00001", total=10, unit="jobs", every_s=0.3, stream=out):
        import time
        time.sleep(1.6)  # a slow server: nothing finishes, the log still shows the stage is alive
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and lines[0].startswith("judge 00000of00001: 0/10 jobs (0%), 0 jobs/s, elapsed 0:00:0")
    assert lines[-1].startswith("judge 00000of00001 done: 0 jobs")
