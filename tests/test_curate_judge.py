"""The judge stage on tiny PNGs against a real local OpenAI-compatible server (the stand-in).

The test server's responders read the answer off the image itself (scores from its pixel colour, the
twin choice from the prompt stored in the PNG), so every expected record is computed here from the
images, independently of the judge code: an answer attached to the wrong job would show."""
import base64
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("openai")
from PIL import Image, PngImagePlugin  # noqa: E402

from cultureclip import schema  # noqa: E402
from cultureclip.curate.stages import judge  # noqa: E402
from cultureclip.curate.stages import importer  # noqa: E402
from cultureclip.curate.backends.chat import ChatConfig  # noqa: E402
from cultureclip.curate.registry import Context  # noqa: E402
from cultureclip.curate.runner import Job, Outcome, Store, run_stage, write_atomic  # noqa: E402
from cultureclip.curate.runner.jobs import keyed  # noqa: E402
from cultureclip.curate.backends.standin import Fault, StandinServer, request_images  # noqa: E402

MODEL = "test-vlm"
SIDE_FIELDS = {"pos": (schema.POS_CONCEPT, schema.POS_COUNTRY, schema.POS_CAPTIONS),
               "neg": (schema.NEG_CONCEPT, schema.NEG_COUNTRY, schema.NEG_CAPTIONS)}


def make_pairs(n_pairs, n_captions=2):
    pairs = []
    for t in range(n_pairs):
        pos, neg = f"dish p{t}", f"dish n{t}"
        ident = {schema.CATEGORY: "Cuisine", schema.POS_CONCEPT: pos, schema.POS_COUNTRY: "Aland",
                 schema.NEG_CONCEPT: neg, schema.NEG_COUNTRY: "Bland"}
        pairs.append({schema.TWIN_ID: importer.twin_id(*ident.values()), **ident,
                      schema.POS_CONTEXT: f"context of {pos}", schema.NEG_CONTEXT: f"context of {neg}",
                      schema.POS_FEATURES: ["red", "round"], schema.NEG_FEATURES: [],
                      schema.POS_CAPTIONS: [f"a photo of {pos}, view {i}" for i in range(n_captions)],
                      schema.NEG_CAPTIONS: [f"a photo of {neg}, view {i}" for i in range(n_captions)]})
    return pairs


def png(color, prompt):
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", prompt)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def recs(root):
    """The current records of a store, sorted by key."""
    return sorted(Store(root, Path(root).name).records(), key=lambda r: r[schema.REC_KEY])


def errs(root):
    return {e[schema.REC_KEY]: e for e in Store(root, Path(root).name).errors()}


def make_render(out_dir, pairs, skip_caption=None):
    """The pairs imported (the real importer) and a render store with one tiny PNG per (side, caption),
    written through the runner like the render stage does; the colour comes from the key, the prompt is
    stored in the PNG."""
    src = Path(out_dir) / "pairs-input.jsonl"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    importer.import_pairs([src], out_dir)
    jobs = []
    for pair in pairs:
        for side, (concept_f, country_f, captions_f) in SIDE_FIELDS.items():
            for caption in pair[captions_f]:
                if caption == skip_caption:
                    continue
                ident = {schema.CONCEPT: pair[concept_f], schema.COUNTRY: pair[country_f],
                         schema.CATEGORY: pair[schema.CATEGORY], schema.CAPTION: caption}
                jobs.append(Job(inputs=ident, model="test-t2i", settings={"seed": 0}))
    root = Path(out_dir) / "render"

    def process(todo):
        for job in todo:
            digest = hashlib.sha256(job[schema.REC_KEY].encode()).digest()
            data = png(tuple(digest[:3]), job[schema.CAPTION])
            rel = f"images/{job[schema.REC_KEY][:2]}/{job[schema.REC_KEY]}.png"
            write_atomic(root / rel, data)
            yield Outcome(job[schema.REC_KEY], record={**{k: v for k, v in job.items() if k != schema.REC_KEY},
                                                      schema.IMAGE_FILE: rel,
                                                      schema.IMAGE_SHA256: hashlib.sha256(data).hexdigest()})

    run_stage(Store(root, "render"), jobs, process, upstream=(importer.pairs_store(out_dir),))
    return root


def decode(body):
    url = request_images(body)[0]
    im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return im.getpixel((0, 0)), im.text["prompt"]


def scores_from_pixel(rgb):
    return {name: 1 if c % 8 == 0 else c % 3 + 3 for name, c in zip(schema.SCORES, rgb)}


def test_scores(body):
    return {**scores_from_pixel(decode(body)[0]), schema.REASON: "from the pixel"}


def test_twin(body):
    rgb, prompt = decode(body)
    options = body["response_format"]["json_schema"]["schema"]["properties"][schema.TWIN_CHOICE]["enum"]
    own = next(o for o in options if o in prompt)
    return {schema.TWIN_CHOICE: own if rgb[0] % 4 else next(o for o in options if o != own)}


test_scores.__test__ = test_twin.__test__ = False  # responders, not tests
RESPONDERS = {judge.SCORES_SCHEMA: test_scores, judge.TWIN_SCHEMA: test_twin}


def expected_records(out_dir, pairs):
    """Every judge record, computed from the render store and the images alone."""
    render = {(r[schema.CONCEPT], r[schema.CAPTION]): r for r in recs(Path(out_dir) / "render")}
    out = {}
    for pair in pairs:
        for side, (concept_f, country_f, captions_f) in SIDE_FIELDS.items():
            other = "neg" if side == "pos" else "pos"
            for caption in pair[captions_f]:
                rec = render.get((pair[concept_f], caption))
                if rec is None:
                    continue
                im = Image.open(Path(out_dir) / "render" / rec[schema.IMAGE_FILE])
                rgb = im.getpixel((0, 0))
                own = rgb[0] % 4 != 0
                twin_concept = pair[SIDE_FIELDS[other][0]]
                out[(rec[schema.REC_KEY], side)] = {
                    **scores_from_pixel(rgb), schema.PICKS_OWN: own,
                    schema.TWIN_CHOICE: pair[concept_f] if own else twin_concept,
                    schema.TWIN_CONCEPT: twin_concept, schema.TWIN_ID: pair[schema.TWIN_ID],
                    schema.CONCEPT: pair[concept_f]}
    return out


def reference_passes(rec, min_score=2, min_mean=3.0, twin=True):
    scores = [rec[schema.SCORE_AUTHENTICITY], rec[schema.SCORE_CONSISTENCY], rec[schema.SCORE_FIDELITY]]
    return all(s >= min_score for s in scores) and sum(scores) > 3 * min_mean and (rec[schema.PICKS_OWN] or not twin)


def ctx_for(out_dir, server, **chat):
    return Context(out_dir=Path(out_dir), chat={"base_url": server.url, "model": MODEL, "timeout_s": 5,
                                                "max_attempts": 2, "backoff_s": 0.01, "concurrency": 4, **chat})


def test_judge_jobs_join_and_dedup(tmp_path):
    pairs = make_pairs(2)
    make_render(tmp_path, pairs, skip_caption=pairs[0][schema.POS_CAPTIONS][1])
    renders = recs(tmp_path / "render")
    swapped = {**pairs[1], schema.POS_CONCEPT: pairs[1][schema.NEG_CONCEPT], schema.NEG_CONCEPT: pairs[1][schema.POS_CONCEPT],
               schema.POS_COUNTRY: "Bland", schema.NEG_COUNTRY: "Aland",
               schema.POS_CAPTIONS: pairs[1][schema.NEG_CAPTIONS], schema.NEG_CAPTIONS: pairs[1][schema.POS_CAPTIONS]}
    chat = ChatConfig(base_url="http://127.0.0.1:1/v1", model=MODEL)
    counts = {}
    jobs, dup = keyed("judge", judge.judge_jobs(pairs + [swapped, pairs[1]], renders, chat, tmp_path / "render",
                                                counts))
    assert counts == {"captions": 16, "captions_without_image": 1}
    assert len(jobs) == 11 and dup == 4  # the pair listed twice is the same work; its swap is other work
    for job in jobs:
        assert Path(job[schema.IMAGE_FILE]).is_file()
        assert {job[schema.CONCEPT], job[schema.TWIN_CONCEPT]} in ({p[schema.POS_CONCEPT], p[schema.NEG_CONCEPT]} for p in pairs)
    keys = {j[schema.REC_KEY] for j in jobs}
    for change in ({"model": "other-vlm"}, {"temperature": 0.7}, {"extra_body": {"top_k": 1}}):
        other = judge.judge_jobs(pairs, renders, ChatConfig(**{**chat.__dict__, **change}), tmp_path / "render")
        assert not {j[schema.REC_KEY] for j in keyed("judge", other)[0]} & keys, change
    for change in ({"concurrency": 1}, {"max_attempts": 9}, {"timeout_s": 1.0}):  # do not change answers
        same = judge.judge_jobs(pairs, renders, ChatConfig(**{**chat.__dict__, **change}), tmp_path / "render")
        assert {j[schema.REC_KEY] for j in keyed("judge", same)[0]} <= keys, change
    edited = [{**pairs[0], schema.POS_FEATURES: ["red", "square"]}, pairs[1]]  # the scores prompt carries features
    changed = judge.judge_jobs(edited, renders, chat, tmp_path / "render")
    changed_keys = {j[schema.REC_KEY] for j in keyed("judge", changed)[0]}
    assert len(changed_keys - keys) == 1  # exactly the one pos image of pair 0 that exists
    same_name = {**pairs[0], schema.NEG_CONCEPT: pairs[0][schema.POS_CONCEPT], schema.NEG_COUNTRY: "Aland"}
    with pytest.raises(ValueError, match=pairs[0][schema.TWIN_ID]):
        judge.twin_labels({schema.CONCEPT: "x", schema.TWIN_CONCEPT: "x", schema.COUNTRY: "A", schema.TWIN_COUNTRY: "A",
                           schema.TWIN_ID: same_name[schema.TWIN_ID]})


def test_judge_stage_records_and_pass_rule(tmp_path):
    pairs = make_pairs(3)
    make_render(tmp_path, pairs)
    with StandinServer(RESPONDERS) as server:
        report = judge.run({}, ctx_for(tmp_path, server))
        assert server.by_schema == {judge.SCORES_SCHEMA: 12, judge.TWIN_SCHEMA: 12}
        twin_texts = [b["messages"][0]["content"][1]["text"] for b in server.bodies
                      if b["response_format"]["json_schema"]["name"] == judge.TWIN_SCHEMA]
    assert (report.ok, report.errors, report.jobs_total) == (12, 0, 12)
    for text in twin_texts:  # blind: both names, sorted, and no context that gives the answer away
        assert '"dish n' in text and text.index('"dish n') < text.index('"dish p') and "context of" not in text
    records = recs(tmp_path / "judge")
    expected = expected_records(tmp_path, pairs)
    got = {(r[schema.RENDER_KEY], r[schema.SIDE]): r for r in records}
    assert set(got) == set(expected)
    for k, exp in expected.items():
        assert {f: got[k][f] for f in exp} == exp
        assert got[k][schema.MODEL_ID] == MODEL
    verdicts = [judge.passes(r) for r in records]
    assert verdicts == [reference_passes(r) for r in records] and 0 < sum(verdicts) < len(records)
    assert [judge.passes(r, {"require_twin_check": False}) for r in records] == \
        [reference_passes(r, twin=False) for r in records]


def test_pass_rule_edges():
    rec = {schema.SCORE_AUTHENTICITY: 4, schema.SCORE_CONSISTENCY: 4, schema.SCORE_FIDELITY: 1, schema.PICKS_OWN: True}
    assert not judge.passes(rec)  # a score of 1 fails whatever the mean
    assert judge.passes(rec, {"min_score": 1, "min_mean": 2.5})
    rec.update({schema.SCORE_FIDELITY: 2, schema.SCORE_CONSISTENCY: 3})  # mean exactly 3: not above
    assert not judge.passes(rec) and judge.passes({**rec, schema.SCORE_FIDELITY: 3})
    rec = {**rec, schema.SCORE_FIDELITY: 5, schema.PICKS_OWN: False}
    assert not judge.passes(rec) and judge.passes(rec, {"require_twin_check": False})
    with pytest.raises(ValueError, match="unknown judge rule"):
        judge.passes(rec, {"min_means": 3})


def test_failures_are_errors_then_retried_on_rerun(tmp_path):
    pairs = make_pairs(2)
    render_dir = make_render(tmp_path, pairs)
    renders = recs(render_dir)
    (render_dir / renders[0][schema.IMAGE_FILE]).unlink()  # one image lost: an error, and no request for it
    bad_url = "data:image/png;base64," + base64.b64encode((render_dir / renders[1][schema.IMAGE_FILE]).read_bytes()).decode()
    faults = lambda i, body: Fault("schema") if request_images(body)[0] == bad_url else None  # noqa: E731
    with StandinServer(RESPONDERS, faults=faults) as server:
        report = judge.run({}, ctx_for(tmp_path, server))
    assert report.ok == 6 and report.errors_by_reason == {"image_missing": 1, "schema_violation": 1}
    errors = errs(tmp_path / "judge")
    by_reason = {e[schema.REC_ERROR]: e for e in errors.values()}
    assert by_reason["schema_violation"][schema.REC_ATTEMPTS] == 2
    assert "scores" in by_reason["schema_violation"][schema.REC_MESSAGE]
    assert server.requests == 2 * 6 + 2 * 2  # the failing image: both requests twice (max_attempts=2)
    with StandinServer(RESPONDERS) as server:  # the server is fixed: the rerun redoes only the failed key
        report = judge.run({}, ctx_for(tmp_path, server))
        assert server.requests == 2
    assert (report.done_before, report.ok, report.errors_by_reason) == (6, 1, {"image_missing": 1})


def test_secret_key_never_written(tmp_path, monkeypatch, caplog):
    secret = "sk-live-" + "0123456789abcdef" * 3
    monkeypatch.setenv("CC_JUDGE_TEST_KEY", secret)
    pairs = make_pairs(2)
    make_render(tmp_path, pairs)
    caplog.set_level(logging.DEBUG)
    faults = lambda i, body: Fault("503") if i % 5 == 0 else None  # noqa: E731  (errors files get written)
    with StandinServer(RESPONDERS, api_key=secret, faults=faults) as server:
        ctx = ctx_for(tmp_path, server, api_key_env="CC_JUDGE_TEST_KEY", max_attempts=1)
        report = judge.run({}, ctx)
    assert report.ok > 0 and report.errors > 0  # the key reached the server; some answers failed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("errors" in p.parts for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in caplog.text and secret not in json.dumps(report.__dict__)


CONF = Path(__file__).resolve().parents[1] / "conf" / "judge"


def test_configs():
    from omegaconf import OmegaConf
    ctx = Context(out_dir=Path("."), chat={"base_url": None, "model": None})  # the run sets nothing
    chat = judge.chat_config(OmegaConf.load(CONF / "qwen25_vl.yaml"), ctx)
    assert (chat.model, chat.base_url, chat.concurrency) == ("Qwen/Qwen2.5-VL-7B-Instruct", "http://localhost:8000/v1", 64)
    ctx = Context(out_dir=Path("."), chat={"base_url": "http://127.0.0.1:1/v1", "model": None})
    chat = judge.chat_config(OmegaConf.load(CONF / "standin.yaml"), ctx)
    assert (chat.model, chat.base_url) == ("standin-judge", "http://127.0.0.1:1/v1")  # the app's server url wins
    chat = judge.chat_config(OmegaConf.load(CONF / "qwen25_vl.yaml"), ctx)
    assert (chat.model, chat.base_url) == ("Qwen/Qwen2.5-VL-7B-Instruct", "http://127.0.0.1:1/v1")  # here too
    with pytest.raises(ValueError, match="unknown judge settings"):
        judge.run({"chats": {}}, ctx)


def test_standin_responders_and_card(tmp_path):
    from omegaconf import OmegaConf
    pairs = make_pairs(3)
    make_render(tmp_path, pairs)
    with StandinServer(judge.standin_responders()) as server:
        ctx = Context(out_dir=tmp_path, chat={"base_url": server.url})  # as the app sets it for the stand-in
        judge.run(OmegaConf.load(CONF / "standin.yaml"), ctx)
        make_render(tmp_path / "again", pairs)
        ctx.out_dir = tmp_path / "again"
        judge.run(OmegaConf.load(CONF / "standin.yaml"), ctx)
    records = recs(tmp_path / "judge")
    assert len(records) == 12
    assert all(1 <= r[name] <= 5 for r in records for name in schema.SCORES)
    assert sum(r[schema.PICKS_OWN] for r in records) >= 8  # the PNGs carry their prompt: mostly its own
    assert len({tuple(r[n] for n in schema.SCORES) for r in records}) > 1
    assert all(r[schema.MODEL_ID] == "standin-judge" for r in records)
    assert recs(tmp_path / "again" / "judge") == records  # deterministic answers
    card = judge.card_section(tmp_path)
    data = card["data"]
    assert data["judged"] == 12 and data["passed"] == sum(reference_passes(r) for r in records)
    assert data["picks_own"] == sum(r[schema.PICKS_OWN] for r in records)
    for name in schema.SCORES:
        assert [data["histograms"][name][v] for v in range(1, 6)] == [sum(r[name] == v for r in records) for v in range(1, 6)]
    assert f"- pass: {data['passed']} " in card["markdown"]
    json.dumps(card)


KILL_SCRIPT = """
import json, sys
from pathlib import Path
from cultureclip.curate.stages import judge
from cultureclip.curate.registry import Context
out, url = Path(sys.argv[1]), sys.argv[2]
ctx = Context(out_dir=out, chat={"base_url": url, "model": "%s", "timeout_s": 5, "max_attempts": 2,
                                 "backoff_s": 0.01, "concurrency": 2})
judge.run({"part_size": 3}, ctx)
""" % MODEL


@pytest.mark.slow
def test_kill9_mid_judge_then_rerun_matches_uninterrupted(tmp_path):
    pairs = make_pairs(10)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for d in (killed, clean):
        make_render(d, pairs)
    script = tmp_path / "judge_run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with StandinServer(RESPONDERS, latency_s=0.03) as server:
        proc = subprocess.Popen([sys.executable, str(script), str(killed), server.url], env=env)
        deadline = time.monotonic() + 20
        parts = killed / "judge" / "parts"
        while time.monotonic() < deadline and proc.poll() is None:
            if server.requests >= 40 and parts.is_dir() and any(parts.iterdir()):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the judge finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        done = {r[schema.IMAGE_SHA256] for r in recs(killed / "judge")}
        assert 0 < len(done) < 40
        before = len(server.bodies)
        report = judge.run({}, ctx_for(killed, server))
        asked = {hashlib.sha256(base64.b64decode(request_images(b)[0].split(",", 1)[1])).hexdigest()
                 for b in server.bodies[before:]}
        assert not asked & done  # nothing already judged is asked again
        assert len(server.bodies) - before == 2 * (40 - len(done)) and report.done_before == len(done)
        judge.run({}, ctx_for(clean, server))
    Store(killed / "judge", "judge").verify()
    assert recs(killed / "judge") == recs(clean / "judge")
    assert sum(1 for p in (killed / "judge" / "parts").iterdir() for _ in p.open()) == 40  # no duplicate lines
