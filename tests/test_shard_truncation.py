"""Shards cut short (issue: a tar cut at a block boundary reads as a shorter, valid one).

Every tar writer ends an archive with two zero blocks; a shard whose stream ends without them is
counted as ``truncated_shard`` (or raised with ``on_error="raise"``) by every reader: the evaluation
pass, the training stream, the validation vocabulary, the datamodule and the shard validator.
Correctly written shards from ``tarfile``, webdataset's ``TarWriter`` and GNU tar are never flagged.
"""
import io
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import open_clip
import pytest
import webdataset as wds
from PIL import Image

import cultureclip
from cultureclip import schema
from cultureclip.data import pipeline as P
from cultureclip.data.shards import TwinShardWriter
from cultureclip.data.tarcheck import ShardDamage
from cultureclip.data.validate import check_shards

TRUNC, MISSING = P.TRUNCATED_SHARD, P.MISSING_MEMBER
PAIRS = 6  # pairs per shard; 3 members each (pos image, neg image, json)
SIZE = 16
REPO = Path(cultureclip.__file__).parents[1]


def meta(i):
    return {schema.POS_CAPTION: f"a photo of pos thing {i}", schema.NEG_CAPTION: f"a photo of neg thing {i}",
            schema.POS_CONCEPT: f"pos concept {i}", schema.NEG_CONCEPT: f"neg concept {i}"}


def png(i):
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (10 * i, 0, 100)).save(buf, format="PNG")
    return buf.getvalue()


def key(i):
    return f"pair{i:04d}"


def write_twins(folder, indices, per_shard=PAIRS):
    with TwinShardWriter(folder, maxcount=per_shard) as w:
        for i in indices:
            w.write(key(i), png(i), png(i + 1), meta(i))
    return folder


def cut_point(shard, where):
    """Byte offset to cut ``shard`` at, computed from its member table (independent of the reader)."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512  # end of the last member's data blocks
    return {"boundary": members[9].offset,  # block-aligned: right before pair 3's first member header
            "header": members[9].offset + 100,  # inside pair 3's first header block
            "data": members[10].offset_data + 7,  # inside pair 3's second member: pair 3 is left partial
            "marker": end + 512,  # all members, but only one of the two closing zero blocks
            }[where]


# (good pairs read, {reason: count} with sizes.json, {reason: count} without): derived from the cut points
EXPECTED = {
    "boundary": (3, {TRUNC: 3}, {TRUNC: 1}),
    "header": (3, {TRUNC: 3}, {TRUNC: 1}),
    "data": (3, {TRUNC: 2, MISSING: 1}, {TRUNC: 1, MISSING: 1}),  # pair 3 arrives without its neg image
    "marker": (6, {TRUNC: 1}, {TRUNC: 1}),
}
CUTS = sorted(EXPECTED)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(SIZE, is_train=False)


def cut_split(folder, where, sizes):
    """A split of two shards: pairs 0..5 cut at ``where`` and pairs 10..15 intact."""
    write_twins(folder, [*range(PAIRS), *range(10, 10 + PAIRS)])
    shard = folder / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut_point(shard, where)])
    if not sizes:
        (folder / schema.SIZES_FILE).unlink()
    n_good, with_sizes, without = EXPECTED[where]
    good = [key(i) for i in [*range(n_good), *range(10, 10 + PAIRS)]]
    return shard, good, with_sizes if sizes else without


def keys_of(batches):
    return [k for b in batches if not schema.is_skip_report(b) for k in b[schema.KEY]]


# ---------------------------------------------------------------- every reader counts the cut

@pytest.mark.parametrize("sizes", [True, False], ids=["sizes_json", "no_sizes_json"])
@pytest.mark.parametrize("where", CUTS)
def test_cut_shard_is_counted_by_the_evaluation_pass_and_the_validator(tmp_path, tokenizer, preprocess, where,
                                                                      sizes, caplog):
    shard, good, reasons = cut_split(tmp_path / "s", where, sizes)
    pipe = P.build_twin_pipeline(str(tmp_path / "s"), preprocess, tokenizer, 4, train=False)
    with caplog.at_level(logging.WARNING):
        batches = list(pipe)
    assert keys_of(batches) == good  # every intact pair, once, in order
    assert pipe.skip_counter.by_reason == reasons
    assert sum(b[schema.N_SKIPPED] for b in batches) == sum(reasons.values())
    assert f"skipped shard {shard} ({TRUNC})" in caplog.text
    # the validator and the validation vocabulary read through the same check
    report = check_shards(str(tmp_path / "s"))
    assert (report.shards, report.pairs, report.skipped_by_reason) == (2, len(good), reasons) and not report.ok
    counter = P.SkipCounter()
    P.read_concept_names(str(tmp_path / "s"), skip_counter=counter)
    assert counter.by_reason == reasons


@pytest.mark.parametrize("where", ["boundary", "header", "data"])
def test_cut_shard_is_counted_by_the_training_stream(tmp_path, tokenizer, preprocess, where):
    cut_split(tmp_path / "s", where, sizes=False)
    shard = tmp_path / "s" / "shard-000000.tar"
    pipe = P.build_twin_pipeline([str(shard)], preprocess, tokenizer, 1, train=True, shuffle_buffer=0)
    n_good = EXPECTED[where][0]
    batches = [b for _, b in zip(range(3 * n_good + 1), pipe)]  # resampled: the cut shard, three times
    assert set(keys_of(batches)) == {key(i) for i in range(n_good)}
    assert pipe.skip_counter.by_reason[TRUNC] >= 3  # once per pass over the shard
    assert sum(b[schema.N_SKIPPED] for b in batches) >= 3


@pytest.mark.parametrize("sizes", [True, False], ids=["sizes_json", "no_sizes_json"])
def test_datamodule_counts_the_cut_in_training_and_validation(tmp_path, sizes):
    from cultureclip.data.datamodule import TwinDataModule
    spec = cultureclip.CultureCLIP.from_pretrained("cultureclip-tiny").data_spec()
    _, good, reasons = cut_split(tmp_path / "val", "boundary", sizes)
    write_twins(tmp_path / "train", range(4), per_shard=4)
    dm = TwinDataModule(spec, str(tmp_path / "train"), str(tmp_path / "val"), batch_size=4, num_workers=0,
                        shuffle_buffer=0)
    dm.setup("fit")
    assert len(dm.val_concepts) == 2 * len(good)
    val = list(dm.val_dataloader())
    assert keys_of(val) == good and sum(b[schema.N_SKIPPED] for b in val) == sum(reasons.values())
    # the training stream over the cut split: the missing pairs are counted, never read as an epoch's worth
    dm = TwinDataModule(spec, str(tmp_path / "val" / "shard-000000.tar"), None, batch_size=2, num_workers=0,
                        shuffle_buffer=0, train_pairs_per_epoch=4)
    dm.setup("fit")
    batches = list(dm.train_dataloader())  # 3 pairs per pass over the shard: the second batch starts a new pass
    skipped = sum(b[schema.N_SKIPPED] for b in batches)  # one count (or the missing pairs) per pass read
    assert keys_of(batches)[:3] == good[:3] and skipped >= reasons[TRUNC] and skipped % reasons[TRUNC] == 0


# ---------------------------------------------------------------- on_error="raise"

@pytest.mark.parametrize("where", CUTS)
def test_raise_stops_with_one_line_naming_the_shard(tmp_path, tokenizer, preprocess, where):
    shard, _, _ = cut_split(tmp_path / "s", where, sizes=False)
    pipe = P.build_twin_pipeline(str(tmp_path / "s"), preprocess, tokenizer, 4, train=False, on_error="raise")
    with pytest.raises(ShardDamage) as err:
        list(pipe)
    assert str(err.value).startswith(f"shard {shard}: cut short") and "\n" not in str(err.value)
    assert err.value.reason == TRUNC and isinstance(err.value, ValueError)
    with pytest.raises(ShardDamage, match=f"shard {shard}: cut short"):
        check_shards(str(tmp_path / "s"), on_error="raise")
    with pytest.raises(ShardDamage, match=f"shard {shard}: cut short"):
        P.read_concept_names(str(tmp_path / "s"), on_error="raise")


def test_raise_from_a_loader_worker_keeps_the_error_type(tmp_path, tokenizer, preprocess):
    shard, _, _ = cut_split(tmp_path / "s", "boundary", sizes=False)
    pipe = P.build_twin_pipeline(str(shard), preprocess, tokenizer, 4, train=False, on_error="raise")
    with pytest.raises(ShardDamage, match=f"shard {shard}: cut short"):
        list(P.make_loader(pipe, num_workers=1))


def test_sizes_json_shortfall_raises_too(tmp_path, tokenizer, preprocess):
    folder = write_twins(tmp_path / "s", range(PAIRS))
    (folder / schema.SIZES_FILE).write_text(json.dumps({"shard-000000.tar": PAIRS + 2}))  # intact, but listed longer
    assert check_shards(str(folder)).skipped_by_reason == {TRUNC: 2}
    with pytest.raises(ShardDamage, match=r"holds 6 of the 8 pairs its sizes.json lists"):
        check_shards(str(folder), on_error="raise")


# ---------------------------------------------------------------- correctly written shards are never flagged

def twin_members(n=2):
    """``[(member name, bytes)]`` of ``n`` twin pairs, as any writer would store them."""
    out = []
    for i in range(n):
        out += [(f"{key(i)}.pos.png", png(i)), (f"{key(i)}.neg.png", png(i + 1)),
                (f"{key(i)}.json", json.dumps(meta(i)).encode())]
    return out


def write_with_tarfile(path, fmt, mode="w"):
    with tarfile.open(path, mode, format=fmt) as tf:
        for name, data in twin_members():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5  # a float mtime: pax headers in PAX_FORMAT
            tf.addfile(info, io.BytesIO(data))


def write_with_gnu_tar(path, *options):
    src = path.parent / "src"
    src.mkdir()
    for name, data in twin_members():
        (src / name).write_bytes(data)
    subprocess.run(["tar", "-cf", str(path), *options, "-C", str(src), *sorted(p.name for p in src.iterdir())],
                   check=True)


def write_with_tarwriter(path):
    with wds.TarWriter(str(path)) as w:  # its default: float mtimes, so pax headers on every member
        for i in range(2):
            w.write({schema.KEY: key(i), "pos.png": png(i), "neg.png": png(i + 1), "json": json.dumps(meta(i))})


WRITERS = {
    "tarfile_ustar": lambda p: write_with_tarfile(p, tarfile.USTAR_FORMAT),
    "tarfile_gnu": lambda p: write_with_tarfile(p, tarfile.GNU_FORMAT),
    "tarfile_pax": lambda p: write_with_tarfile(p, tarfile.PAX_FORMAT),
    "tarfile_gz": lambda p: write_with_tarfile(p, tarfile.PAX_FORMAT, "w:gz"),
    "tarwriter": write_with_tarwriter,
    "twin_shard_writer": lambda p: write_twins(p.parent / "tw", range(2)) and shutil.move(
        p.parent / "tw" / "shard-000000.tar", p),
    "gnu_tar": lambda p: write_with_gnu_tar(p),
    "gnu_tar_posix": lambda p: write_with_gnu_tar(p, "--format=posix"),
    "gnu_tar_one_block_records": lambda p: write_with_gnu_tar(p, "-b", "1"),  # no record padding at all
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_correct_shards_from_every_writer_are_not_flagged(tmp_path, tokenizer, preprocess, writer):
    if writer.startswith("gnu_tar") and shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    shard = tmp_path / "shard-000000.tar"
    WRITERS[writer](shard)
    pipe = P.build_twin_pipeline([str(shard)], preprocess, tokenizer, 4, train=False)
    assert keys_of(list(pipe)) == [key(0), key(1)] and pipe.skip_counter.by_reason == {}
    report = check_shards([str(shard)])
    assert report.ok and report.pairs == 2
    for url in (f"pipe:cat {shard}", str(shard)):
        assert check_shards([url], on_error="raise").ok


# ---------------------------------------------------------------- piped and remote shards

def test_piped_shard_gets_the_same_check(tmp_path, tokenizer, preprocess):
    shard, _, _ = cut_split(tmp_path / "s", "boundary", sizes=True)  # sizes.json is not read for pipes
    intact = tmp_path / "s" / "shard-000001.tar"
    urls = [f"pipe:cat {shard}", f"pipe:cat {intact}"]
    pipe = P.build_twin_pipeline(urls, preprocess, tokenizer, 4, train=False)
    assert keys_of(list(pipe)) == [*map(key, range(3)), *map(key, range(10, 16))]
    assert pipe.skip_counter.by_reason == {TRUNC: 1}
    # a stream cut by the command itself, inside a header block
    cut = cut_point(intact, "header")
    assert check_shards([f"pipe:head -c {cut} {intact}"]).skipped_by_reason == {TRUNC: 1}
    with pytest.raises(ShardDamage, match=f"shard pipe:cat {shard}: cut short"):
        check_shards([urls[0]], on_error="raise")


def test_make_shards_check_command(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_shards
    finally:
        sys.path.remove(str(REPO / "tools"))
    shard, _, _ = cut_split(tmp_path / "s", "header", sizes=False)
    assert make_shards.main(["--check", str(tmp_path / "s"), "--on-error", "skip"]) == 1
    assert "checked 2 shard(s): 9 usable pairs; skipped truncated_shard 1" in capsys.readouterr().out
    assert make_shards.main(["--check", str(tmp_path / "s")]) == 1  # raise: the default
    err = capsys.readouterr().err
    assert err.startswith(f"error: ShardDamage: shard {shard}: cut short") and err.count("\n") == 1
    write_twins(tmp_path / "ok", range(3))
    assert make_shards.main(["--check", str(tmp_path / "ok")]) == 0
    assert "3 usable pairs; no problem found" in capsys.readouterr().out


# ---------------------------------------------------------------- the command lines, end to end

def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.slow  # three CLI runs
def test_cli_train_and_evaluate_count_or_raise_a_cut_shard(tmp_path):
    _, good, _ = cut_split(tmp_path / "val", "boundary", sizes=False)
    shard = tmp_path / "val" / "shard-000000.tar"
    run = tmp_path / "run"  # trains on the cut split too (no sizes.json: the epoch length is given)
    proc = run_cli("-m", "cultureclip.train", "data=cultwin", "+experiment=smoke", f"data.train_shards={shard}",
                   f"data.val_shards={tmp_path / 'val'}", f"paths.run_dir={run}", "trainer.limit_val_batches=null",
                   "data.train_pairs_per_epoch=32", "data.shuffle_buffer=0", f"paths.data_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped shard {shard} ({TRUNC}): cut short" in proc.stdout + proc.stderr  # hydra logs to stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"]["val/skipped_samples"] == metrics["after"]["val/skipped_samples"] == 1
    logged = [row for csv in run.rglob("metrics.csv") for row in csv.read_text().splitlines()]
    column = logged[0].split(",").index("train/skipped_samples")
    counts = [float(r.split(",")[column]) for r in logged[1:] if r.split(",")[column]]
    assert counts and max(counts) >= 1  # 3 pairs per pass over the cut shard: every pass counts it

    evaluate = ["-m", "cultureclip.evaluate", "eval=twins", "device=cpu", "report=false",
                f"eval.tasks.twins.shards={tmp_path / 'val'}", "eval.tasks.twins.num_workers=0",
                f"paths.root_dir={tmp_path}"]
    proc = run_cli(*evaluate)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "twins: 1 samples were skipped" in proc.stdout and f"skipped shard {shard} ({TRUNC})" in proc.stdout
    result = json.loads(Path(proc.stdout.split("twins: ")[1].split("\n")[0]).read_text())
    assert result["metrics"]["n_skipped"] == 1 and result["n"] == 2 * len(good)

    proc = run_cli(*evaluate, "eval.tasks.twins.on_error=raise")
    assert proc.returncode != 0 and f"shard {shard}: cut short" in proc.stderr


@pytest.mark.parametrize("writer", ["tarwriter", "gnu_tar"])
def test_every_cut_before_the_end_marker_is_flagged_and_none_after(tmp_path, writer):
    if writer == "gnu_tar" and shutil.which("tar") is None:
        pytest.skip("GNU tar is not installed")
    whole = tmp_path / "whole.tar"
    WRITERS[writer](whole)
    data = whole.read_bytes()
    with tarfile.open(whole) as tf:  # the marker's end, from the member table: last data blocks + 2 zero blocks
        last = tf.getmembers()[-1]
    marker_end = last.offset_data + -(-last.size // 512) * 512 + 1024
    assert marker_end < len(data)  # both writers pad the archive to whole records after the marker
    cut = tmp_path / "cut.tar"
    for at in sorted({*range(0, len(data) + 1, 512), *range(100, len(data), 512)}):  # block edges and inside
        cut.write_bytes(data[:at])
        reasons = check_shards([str(cut)]).skipped_by_reason
        flagged = reasons.keys() & {TRUNC, P.BAD_SHARD}
        assert bool(flagged) == (at < marker_end), f"cut at byte {at} of {len(data)}"
        # a cut is always "cut short", never mistaken for a damaged header
        assert (TRUNC in reasons) == (at < marker_end) and P.BAD_SHARD not in reasons, (at, reasons)
