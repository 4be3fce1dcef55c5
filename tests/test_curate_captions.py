"""Stage captions on the stand-in server: exactly n valid captions per concept (retried, never padded),
the pairs records render reads, per-item prompts; and kill -9 of the upstream chain, then rerun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pydantic")
pytest.importorskip("openai")

from cultureclip.curate.stages import captions, concepts, dedup, twins  # noqa: E402
from cultureclip.curate.stages import upstream as up  # noqa: E402
from cultureclip.curate.runner import Store  # noqa: E402
from cultureclip.curate.backends.standin import request_text, schema_name  # noqa: E402
from test_curate_concepts import ctx_for, standin, top_down_cfg  # noqa: E402

NGRAM = {"backend": "ngram"}
COUNTRIES = ["India", "Japan", "South Korea", "Vietnam"]
N = 4


def run_chain(out, srv, n=N):
    ctx = ctx_for(out, srv)
    concepts.run(top_down_cfg(COUNTRIES, ["Cuisine", "Clothing"], 3), ctx)
    dedup.run({"embedding": NGRAM, "threshold": 0.75}, ctx)
    twins.run({"embedding": NGRAM, "llm_candidates": 2, "mined_candidates": 2, "keep": 1}, ctx)
    return captions.run({"n": n}, ctx)


def test_check_caption():
    c = {"concept": "Phở", "native_name": "phở", "features": ["rice noodles", "clear beef broth"]}
    ok = dict(seen=set(), scenes=set(), max_words=14, require_name=True)
    assert captions.check_caption("Pho with rice noodles at a street stall", "street stall", c, **ok) is None
    assert captions.check_caption("Phở with clear broth at a family table", "family table", c, **ok) is None
    assert captions.check_caption(" ".join(["Pho", "with", "rice", "noodles"] + ["x"] * 11), "s", c, **ok) == "too_long"
    assert captions.check_caption(" ".join(["Pho", "with", "rice", "noodles"] + ["x"] * 10), "s", c, **ok) is None
    assert captions.check_caption("", "s", c, **ok) == "empty"
    assert captions.check_caption("A bowl with rice noodles", "s", c, **ok) == "no_concept_name"
    assert captions.check_caption("Phở at a street stall", "s", c, **ok) == "no_feature"
    seen = dict(ok, seen={"pho with rice noodles"})
    assert captions.check_caption("PHO with rice-noodles!", "s", c, **seen) == "duplicate"
    scenes = dict(ok, scenes={"street stall"})
    assert captions.check_caption("Pho with rice noodles", "Street stall", c, **scenes) == "duplicate_scene"


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """concepts -> dedup -> twins -> captions on the stand-in server, once for this module."""
    out = tmp_path_factory.mktemp("chain")
    with standin(concepts, twins, captions) as srv:
        report = run_chain(out, srv)
        bodies = [b for b in srv.bodies if schema_name(b) == "CaptionSet"]
    return out, report, bodies


def test_caption_sets_and_pairs(chain_run):
    tmp_path, report, bodies = chain_run
    sets = Store(tmp_path / "captions" / "sets", "caption_sets")
    ok_sets, failed = list(sets.records()), list(sets.rejections())
    # the demo table's Sherwani only ever gets too-long captions: a rejection (never padded, never re-billed)
    assert [e["reason"] for e in failed] == ["incomplete_caption_set"] and not list(sets.errors())
    (msg,) = [e["message"] for e in failed]
    assert msg.startswith("Sherwani (India): 0 of 4 valid captions after 3 requests") and "too_long" in msg
    for r in ok_sets:
        caps = r["captions"]
        assert len(caps) == N and len({up.normalize_name(c) for c in caps}) == N
        assert all(len(c.split()) < 15 for c in caps)
        assert all(r["concept"] in c and any(f in c for f in r["features"]) for c in caps)
        assert len(set(r["scenes"])) == N
        assert r["rounds"] == 2 and r["rejected"] == {"duplicate": 1, "too_long": 1}  # retried for the 2 missing
    pairs = list(Store(tmp_path / "captions", "captions").records())
    assert report.ok == len(pairs) > 0
    pair_rejections = list(Store(tmp_path / "captions", "captions").rejections())
    assert {e["reason"] for e in pair_rejections} == {"caption_set_rejected"} and report.errors == 0
    assert all("Sherwani" in e["message"] for e in pair_rejections)
    by_side = {(r["concept"], r["country"]): r for r in ok_sets}
    for p in pairs:
        assert p["pos_country"] != p["neg_country"]
        for side in ("pos", "neg"):
            s = by_side[(p[f"{side}_concept"], p[f"{side}_country"])]
            assert p[f"{side}_captions"] == s["captions"] and p[f"{side}_features"] == s["features"]
            assert p[f"{side}_context"] == s["context"]
        assert set(p) == {"key", "twin_id", "category", *(f"{s}_{f}" for s in ("pos", "neg") for f in
                                                          ("concept", "country", "context", "features", "captions"))}
    idents = [frozenset({(p["pos_concept"], p["pos_country"]), (p["neg_concept"], p["neg_country"])}) for p in pairs]
    assert len(set(idents)) == len(idents)  # a twin pair seen from both sides is written once
    # each request names only its own concept; the follow-up lists that concept's accepted captions
    first = [up.read_block(request_text(b)) for b in bodies if "Already written: \n" in request_text(b)
             or request_text(b).rstrip().endswith("Already written:")]
    # one first request per caption set (Sherwani, never accepting a caption, asks afresh 3 times)
    expected = [r["concept"] for r in ok_sets] + 3 * [e["message"].split(" (")[0] for e in failed]
    assert sorted(f["Concept"] for f in first) == sorted(expected)
    for b in bodies:
        f = up.read_block(request_text(b))
        for have in filter(None, f.get("Already written", "").split("; ")):
            assert have.startswith(f["Concept"])
    card = captions.card_section(tmp_path)
    assert card["data"]["twin_pairs"] == len(pairs) and card["data"]["caption_sets"] == len(ok_sets)
    assert sum(card["data"]["by_category"].values()) == len(pairs)


def test_render_reads_the_pairs(chain_run):
    importer = pytest.importorskip("cultureclip.curate.stages.importer")
    tmp_path = chain_run[0]
    got = importer.load_pairs(tmp_path)
    assert [p["twin_id"] for p in got] == sorted(p["twin_id"] for p in Store(
        tmp_path / "captions", "captions").records())


CHAIN = """
import sys, json
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_curate_captions import run_chain
from test_curate_concepts import standin
from cultureclip.curate.stages import concepts, twins, captions
with standin(concepts, twins, captions, latency_s={latency}) as srv:
    run_chain(Path(sys.argv[1]), srv)
"""


def _snapshot(out: Path) -> dict:
    stores = {"concepts": "concepts", "dedup": "dedup", "twins": "twins", "captions/sets": "caption_sets",
              "captions": "captions"}
    snap = {}
    for folder, stage in stores.items():
        store = Store(out / folder, stage)
        store.verify()
        key = lambda r: r["key"]  # noqa: E731
        snap[folder] = (sorted(store.records(), key=key), sorted(store.rejections(), key=key),
                        sorted(store.errors(), key=key))
    return snap


@pytest.mark.slow
def test_kill_9_then_rerun_gives_identical_output(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    tests = str(Path(__file__).parent)

    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", CHAIN.format(tests=tests, latency=0.02), str(out)], env=env)
    deadline = time.monotonic() + 60
    while not (out / "twins" / "stage.json").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)  # kill it once twins has started (concepts and dedup finished, twins not)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    assert not (out / "captions" / "parts").exists()  # it really was stopped mid-way
    with standin(concepts, twins, captions) as srv:  # the same command again, and an uninterrupted run
        run_chain(out, srv)
        run_chain(tmp_path / "ref", srv)
    assert json.dumps(_snapshot(out), sort_keys=True) == json.dumps(_snapshot(tmp_path / "ref"),
                                                                                 sort_keys=True)


def test_stages_refuse_unfinished_input(tmp_path):
    with standin(concepts, twins, captions) as srv:
        ctx = ctx_for(tmp_path, srv)
        concepts.run(top_down_cfg(COUNTRIES, ["Cuisine"], 2), ctx)
        with pytest.raises(ValueError, match="run stage=dedup once, with num_shards=1"):
            dedup.run({"embedding": NGRAM}, ctx_for(tmp_path, srv, shard_index=0, num_shards=2))
        dedup.run({"embedding": NGRAM}, ctx)
        half = ctx_for(tmp_path, srv, shard_index=0, num_shards=2)
        report = twins.run({"embedding": NGRAM, "keep": 1}, half)
        with pytest.raises(ValueError, match=rf"{report.jobs_total - report.jobs_in_range} of {report.jobs_total} "
                                             r"current twins jobs are neither done nor rejected"):
            captions.run({"n": N}, ctx)
        twins.run({"embedding": NGRAM, "keep": 1}, ctx_for(tmp_path, srv, shard_index=1, num_shards=2))
        assert captions.run({"n": N}, ctx).ok > 0
