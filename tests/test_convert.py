"""Tests for the record-to-shard converter (cultureclip.data.convert) and tools/make_shards.py."""
from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cultureclip import schema
from cultureclip.data.convert import REPORT_FILE, convert_to_shards, iter_records
from cultureclip.data.shards import RecordError, read_sizes

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, size, color=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def _sizes(i: int):
    """Distinct sizes per row and twin, so a swapped or substituted image is detected."""
    return (40 + i, 30), (30, 50 + i)


def _row(i: int, root: Path, fmt: str = "authors", **extra) -> dict:
    pos_size, neg_size = _sizes(i)
    _image(root / f"p{i}.png", pos_size, fmt="PNG")
    _image(root / f"n{i}.jpg", neg_size, color=(10, 90, 200), fmt="JPEG")
    cols = (schema.POS_IMAGE_PATH, schema.NEG_IMAGE_PATH) if fmt == "authors" else schema.IMAGE_KEYS
    row = {cols[0]: f"p{i}.png", cols[1]: f"n{i}.jpg",
           schema.POS_CAPTION: f"a cheongsam {i}", schema.NEG_CAPTION: f"a kimono {i}",
           schema.POS_CONCEPT: "cheongsam", schema.NEG_CONCEPT: "kimono"}
    row.update(extra)
    return row


def _jsonl(path: Path, rows) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _read(out_dir: Path) -> dict:
    """``{key: {member suffix: bytes}}`` over all shards, plus ``{shard: count}``."""
    samples, counts = {}, {}
    for shard in sorted(out_dir.glob("shard-*.tar")):
        keys = set()
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, suffix = member.name.split(".", 1)
                samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
                keys.add(key)
        counts[shard.name] = len(keys)
    return samples, counts


def _decoded_size(data: bytes):
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.size


def _check_samples(samples: dict, n: int, keys=None):
    keys = keys or [f"pair{i:09d}" for i in range(n)]
    assert sorted(samples) == sorted(keys)
    for i, key in enumerate(keys):
        sample = samples[key]
        meta = json.loads(sample[schema.META])
        assert meta[schema.POS_CAPTION] == f"a cheongsam {i}" and meta[schema.NEG_CAPTION] == f"a kimono {i}"
        assert schema.POS_IMAGE_PATH not in meta and schema.POS_IMAGE not in meta
        pos_size, neg_size = _sizes(i)
        assert _decoded_size(sample[f"{schema.POS_PREFIX}.png"]) == pos_size
        assert _decoded_size(sample[f"{schema.NEG_PREFIX}.jpg"]) == neg_size


@pytest.mark.parametrize("layout", ["authors_jsonl", "authors_json_list", "generic_jsonl"])
def test_convert_formats(tmp_path, layout):
    images = tmp_path / "images"
    fmt = "generic" if layout.startswith("generic") else "authors"
    rows = [_row(i, images, fmt, **{schema.CATEGORY: "Clothing"}) for i in range(3)]
    if layout == "authors_json_list":
        src = tmp_path / "rows.json"
        src.write_text(json.dumps(rows, indent=2))
    else:
        src = _jsonl(tmp_path / "rows.jsonl", rows)
    report = convert_to_shards([src], tmp_path / "out", image_root=images)
    assert (report.written, report.skipped) == (3, 0)
    samples, counts = _read(tmp_path / "out")
    _check_samples(samples, 3)
    assert json.loads(samples["pair000000000"][schema.META])[schema.CATEGORY] == "Clothing"
    assert read_sizes(tmp_path / "out") == counts == report.sizes == {"shard-000000.tar": 3}
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["written"] == 3
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")] == []


def test_paths_relative_to_input_folder_and_absolute(tmp_path):
    row0 = _row(0, tmp_path)  # relative, resolved against the input's folder (no image_root)
    row1 = _row(1, tmp_path / "elsewhere")
    row1[schema.POS_IMAGE_PATH] = str(tmp_path / "elsewhere" / "p1.png")  # absolute: kept
    row1[schema.NEG_IMAGE_PATH] = str(tmp_path / "elsewhere" / "n1.jpg")
    src = _jsonl(tmp_path / "rows.jsonl", [row0, row1])
    convert_to_shards([src], tmp_path / "out")
    _check_samples(_read(tmp_path / "out")[0], 2)


def test_resize_sets_shorter_side(tmp_path):
    _image(tmp_path / "p.png", (64, 48), fmt="PNG")
    _image(tmp_path / "n.jpg", (40, 80), fmt="JPEG")
    row = _row(0, tmp_path)
    row.update({schema.POS_IMAGE_PATH: "p.png", schema.NEG_IMAGE_PATH: "n.jpg"})
    convert_to_shards([_jsonl(tmp_path / "r.jsonl", [row])], tmp_path / "out", resize=32)
    sample = _read(tmp_path / "out")[0]["pair000000000"]
    assert _decoded_size(sample[f"{schema.POS_PREFIX}.jpg"]) == (43, 32)
    assert _decoded_size(sample[f"{schema.NEG_PREFIX}.jpg"]) == (32, 64)


def test_maxcount_splits_shards(tmp_path):
    src = _jsonl(tmp_path / "rows.jsonl", [_row(i, tmp_path) for i in range(5)])
    report = convert_to_shards([src], tmp_path / "out", maxcount=2)
    samples, counts = _read(tmp_path / "out")
    _check_samples(samples, 5)
    assert counts == read_sizes(tmp_path / "out") == report.sizes
    assert counts == {"shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}


@pytest.mark.parametrize("drop, field", [
    (schema.POS_CAPTION, schema.POS_CAPTION),
    (schema.NEG_IMAGE_PATH, schema.NEG_IMAGE_PATH),
    (schema.POS_IMAGE_PATH, schema.POS_IMAGE_PATH),  # neither format recognised
])
def test_missing_column_names_line_and_field(tmp_path, drop, field):
    bad = _row(1, tmp_path)
    del bad[drop]
    src = _jsonl(tmp_path / "rows.jsonl", [_row(0, tmp_path), bad, _row(2, tmp_path)])
    with pytest.raises(RecordError) as err:
        convert_to_shards([src], tmp_path / "out")
    assert "rows.jsonl:2" in str(err.value) and field in str(err.value)
    # a failed run leaves nothing that looks like a finished (or partial) dataset
    assert list((tmp_path / "out").iterdir()) == []


def test_empty_caption_is_an_error(tmp_path):
    src = _jsonl(tmp_path / "rows.jsonl", [_row(0, tmp_path, **{schema.NEG_CAPTION: "  "})])
    with pytest.raises(RecordError, match=rf"rows.jsonl:1.*{schema.NEG_CAPTION}"):
        convert_to_shards([src], tmp_path / "out")


def _break_image(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"this is not an image" * 10)
    elif how == "truncated":
        buf = io.BytesIO()
        noise = Image.effect_noise((128, 128), 60).convert("RGB")  # noise: many bytes of scan data
        noise.save(buf, format="JPEG")
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["garbage", "truncated", "missing"])
def test_unreadable_image_names_field_and_path(tmp_path, how):
    src = _jsonl(tmp_path / "rows.jsonl", [_row(0, tmp_path), _row(1, tmp_path)])
    _break_image(tmp_path / "n1.jpg", how)
    with pytest.raises(RecordError) as err:
        convert_to_shards([src], tmp_path / "out")
    msg = str(err.value)
    assert "rows.jsonl:2" in msg and schema.NEG_IMAGE_PATH in msg and str(tmp_path / "n1.jpg") in msg
    assert not (tmp_path / "out" / schema.SIZES_FILE).exists()


def test_skip_mode_counts_lists_and_substitutes_nothing(tmp_path, caplog):
    rows = [_row(i, tmp_path) for i in range(6)]
    del rows[1][schema.POS_CONCEPT]
    _break_image(tmp_path / "p3.png", "truncated")
    _break_image(tmp_path / "n4.jpg", "missing")
    src = _jsonl(tmp_path / "rows.jsonl", rows[:5] + ["{not json"] + rows[5:])
    report = convert_to_shards([src], tmp_path / "out", on_error="skip")
    assert (report.written, report.skipped) == (3, 4)
    assert [where for where, _ in report.skips] == [f"{src}:{n}" for n in (2, 4, 5, 6)]
    assert schema.POS_CONCEPT in report.skips[0][1] and schema.POS_IMAGE_PATH in report.skips[1][1]
    assert sum(r.message.startswith(f"skipped {src}:") for r in caplog.records) == 4
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["skipped"] == 4 and len(saved["skips"]) == 4
    assert saved["skipped_by_reason"] == {"bad_image": 1, "bad_record": 2, "missing_image": 1}
    samples, counts = _read(tmp_path / "out")
    # keys number input rows, so the survivors keep theirs; the invalid JSON line is row 5
    assert sorted(samples) == ["pair000000000", "pair000000002", "pair000000006"]
    for key, i in (("pair000000000", 0), ("pair000000002", 2), ("pair000000006", 5)):
        assert samples[key][f"{schema.POS_PREFIX}.png"] == (tmp_path / f"p{i}.png").read_bytes()
        assert samples[key][f"{schema.NEG_PREFIX}.jpg"] == (tmp_path / f"n{i}.jpg").read_bytes()
    assert counts == read_sizes(tmp_path / "out") == {"shard-000000.tar": 3}


def test_invalid_json_line_and_blank_lines(tmp_path):
    src = _jsonl(tmp_path / "rows.jsonl", [_row(0, tmp_path), "", _row(1, tmp_path), '{"a": 1,'])
    assert [w for w, _ in itertools.islice(iter_records(src), 2)] == [f"{src}:1", f"{src}:3"]
    with pytest.raises(RecordError, match=r"rows.jsonl:4: invalid JSON"):
        list(iter_records(src))
    with pytest.raises(RecordError, match=r"rows.jsonl:4: invalid JSON"):
        convert_to_shards([src], tmp_path / "out")


def test_iter_records_json_list_where(tmp_path):
    src = tmp_path / "rows.json"
    src.write_text(json.dumps([{"a": 1}, {"b": 2}]))
    assert list(iter_records(src)) == [(f"{src}:[0]", {"a": 1}), (f"{src}:[1]", {"b": 2})]


def test_pair_id_is_sanitized_key_and_duplicates_name_both_lines(tmp_path):
    rows = [_row(0, tmp_path, pair_id="cn.jp/0"), _row(1, tmp_path, pair_id=7)]
    report = convert_to_shards([_jsonl(tmp_path / "a.jsonl", rows)], tmp_path / "ok")
    _check_samples(_read(tmp_path / "ok")[0], 2, keys=["cn_jp_0", "7"])
    assert json.loads(_read(tmp_path / "ok")[0]["cn_jp_0"][schema.META])[schema.PAIR_ID] == "cn.jp/0"
    assert report.written == 2

    rows.append(_row(2, tmp_path, pair_id="cn_jp_0"))  # same key after sanitizing
    src = _jsonl(tmp_path / "b.jsonl", rows)
    with pytest.raises(RecordError, match=r"b.jsonl:3: duplicate .*b.jsonl:1"):
        convert_to_shards([src], tmp_path / "dup")
    report = convert_to_shards([src], tmp_path / "dup_skip", on_error="skip")
    assert (report.written, report.skipped) == (2, 1)


def test_refuses_to_overwrite_existing_shards(tmp_path):
    out = tmp_path / "out"
    src = _jsonl(tmp_path / "rows.jsonl", [_row(i, tmp_path) for i in range(3)])
    convert_to_shards([src], out, maxcount=1)
    (out / "notes.txt").write_text("user data")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        convert_to_shards([src], out)
    # a failing overwrite leaves the previous output intact
    bad = _jsonl(tmp_path / "bad.jsonl", [{schema.POS_CAPTION: "x"}])
    with pytest.raises(RecordError):
        convert_to_shards([bad], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    report = convert_to_shards([src], out, overwrite=True)  # one shard now: stale ones go away
    assert report.sizes == {"shard-000000.tar": 3}
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["notes.txt", "shard-000000.tar", schema.SIZES_FILE, REPORT_FILE])
    assert (out / "notes.txt").read_text() == "user data"


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.slow  # a subprocess that imports torch, open_clip and the CLI: seconds of start-up
def test_cli(tmp_path):
    bad = _row(1, tmp_path)
    del bad[schema.NEG_CAPTION]
    src = _jsonl(tmp_path / "rows.jsonl", [_row(0, tmp_path), bad])
    proc = _cli(src, "--out", tmp_path / "out")
    assert proc.returncode != 0
    assert "rows.jsonl:2" in proc.stderr and schema.NEG_CAPTION in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = _cli(src, "--out", tmp_path / "out2", "--on-error", "skip", "--maxcount", "1")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 pairs" in proc.stdout and "skipped 1" in proc.stdout
    assert read_sizes(tmp_path / "out2") == {"shard-000000.tar": 1}


@pytest.mark.slow  # two CLI runs: ~4 s of imports each
def test_cli_pixel_cap_and_16bit_images(tmp_path):
    rows = [_row(i, tmp_path) for i in range(3)]
    _image(tmp_path / "p1.png", (100, 100), fmt="PNG")  # 10000 pixels: over a 64x64 cap
    deep = np.full((30, 40), 50000, dtype=np.uint16)  # a 16-bit gray PNG, resized below
    Image.fromarray(deep).save(tmp_path / "n2.png")
    rows[2][schema.NEG_IMAGE_PATH] = "n2.png"
    src = _jsonl(tmp_path / "rows.jsonl", rows)
    proc = _cli(src, "--out", tmp_path / "out", "--max-pixels", 64 * 64)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"rows.jsonl:2: {schema.POS_IMAGE_PATH} '{tmp_path / 'p1.png'}': image too large" in proc.stderr
    assert "100x100" in proc.stderr and not (tmp_path / "out" / schema.SIZES_FILE).exists()

    proc = _cli(src, "--out", tmp_path / "skip", "--max-pixels", 64 * 64, "--on-error", "skip", "--resize", 20)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 pairs" in proc.stdout and "skipped 1 (too_large 1)" in proc.stdout
    report = json.loads((tmp_path / "skip" / REPORT_FILE).read_text())
    assert report["skipped_by_reason"] == {"too_large": 1} and report["skips"][0][0] == f"{src}:2"
    samples, _ = _read(tmp_path / "skip")
    with Image.open(io.BytesIO(samples["pair000000002"][f"{schema.NEG_PREFIX}.jpg"])) as im:
        out = np.asarray(im.convert("L"), dtype=int)
    assert out.shape == (20, 27) and np.abs(out - (50000 >> 8)).max() <= 2  # scaled, not clipped to 255


def _make_shards_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_shards_tool", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_make_shards_refuses_image_paths_outside_the_image_root(tmp_path, capsys):
    """--image-root root/images holds: '..' and absolute paths elsewhere are refused (naming the line and
    the field) or skipped and counted; a symlink placed inside the root (a hub snapshot's layout) and a
    '..' that stays inside still work; --allow-outside-root packs the outside file as before."""
    main = _make_shards_main()
    root = tmp_path / "root" / "images"
    secret = _image(tmp_path / "outside" / "secret.png", (13, 17), color=(1, 2, 3), fmt="PNG")
    good = _row(0, root)
    (root / "snap").mkdir()
    (root / "snap" / "linked.png").symlink_to(secret)  # a link the root's owner placed inside it
    linked = {**_row(1, root), schema.POS_IMAGE_PATH: "snap/linked.png", schema.NEG_IMAGE_PATH: "snap/../n1.jpg"}
    escape = {**_row(2, root), schema.POS_IMAGE_PATH: "../../outside/secret.png"}
    absolute = {**_row(3, root), schema.NEG_IMAGE_PATH: str(secret)}
    src = _jsonl(tmp_path / "rows.jsonl", [good, linked, escape, absolute])

    assert main([str(src), "--out", str(tmp_path / "a"), "--image-root", str(root)]) == 1
    err = capsys.readouterr().err
    assert f"rows.jsonl:3: {schema.POS_IMAGE_PATH} '../../outside/secret.png' is outside the image root" in err
    assert not (tmp_path / "a" / schema.SIZES_FILE).exists()

    assert main([str(src), "--out", str(tmp_path / "b"), "--image-root", str(root), "--on-error", "skip"]) == 0
    samples, _ = _read(tmp_path / "b")
    assert sorted(samples) == ["pair000000000", "pair000000001"]  # the two rows inside the root
    assert _decoded_size(samples["pair000000001"][f"{schema.POS_PREFIX}.png"]) == (13, 17)  # through the link
    report = json.loads((tmp_path / "b" / REPORT_FILE).read_text())
    assert report["skipped_by_reason"] == {"outside_root": 2}
    assert all(_decoded_size(s[f"{schema.POS_PREFIX}.png"]) != (13, 17) or k == "pair000000001"
               for k, s in samples.items())

    assert main([str(src), "--out", str(tmp_path / "c"), "--image-root", str(root), "--allow-outside-root"]) == 0
    samples, _ = _read(tmp_path / "c")
    assert len(samples) == 4 and _decoded_size(samples["pair000000002"][f"{schema.POS_PREFIX}.png"]) == (13, 17)
    assert _decoded_size(samples["pair000000003"][f"{schema.NEG_PREFIX}.png"]) == (13, 17)
