"""The embedded synthetic twin-pair set: content, held-out validation, determinism, caching, size."""
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from cultureclip import schema
from cultureclip.data import toy
from cultureclip.data.shards import read_sizes, validate_pair_meta

SMALL = dict(train_variants=3, val_variants=2)  # every concept in both splits, in about a second
TINY = dict(train_variants=1, val_variants=1)


def read_split(split_dir):
    """{key: {member suffix: bytes}} for every shard of a split, read with tarfile, plus per-shard counts."""
    samples, counts = {}, {}
    for shard in sorted(Path(split_dir).glob("shard-*.tar")):
        keys = set()
        with tarfile.open(shard) as tar:
            for member in tar:
                key, suffix = member.name.split(".", 1)
                assert suffix not in samples.setdefault(key, {}), f"duplicate member {member.name}"
                samples[key][suffix] = tar.extractfile(member).read()
                keys.add(key)
        counts[shard.name] = len(keys)
    return samples, counts


def metas(samples):
    return [json.loads(members[schema.META]) for members in samples.values()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = toy.make_toy_shards(out, seed=0, **SMALL)
    splits = {split: read_split(out / split) for split in toy.SPLITS}
    table = json.loads((out / toy.CONCEPTS_FILE).read_text())["concepts"]
    return out, summary, splits, table


def test_counts_read_back_from_the_shards(built):
    out, summary, splits, table = built
    train = metas(splits["train"][0])
    concepts = {m[f] for m in train for f in (schema.POS_CONCEPT, schema.NEG_CONCEPT)}
    countries = {m[f] for m in train for f in (schema.POS_COUNTRY, schema.NEG_COUNTRY)}
    assert len(concepts) >= 40
    assert len({m[schema.PAIR_ID] for m in train}) >= 20
    assert len({m[schema.CATEGORY] for m in train}) >= 5
    assert len(countries) >= 15
    assert concepts == {c["name"] for c in table}
    assert summary["concepts"] == len(table) and summary["pairs"] == len(table) // 2
    assert summary["train"]["samples"] == len(table) * SMALL["train_variants"]
    assert summary["val"]["samples"] == len(table) * SMALL["val_variants"]


def test_every_concept_is_an_anchor_in_both_splits(built):
    _, _, splits, table = built
    names = {c["name"] for c in table}
    for split in toy.SPLITS:
        assert {m[schema.POS_CONCEPT] for m in metas(splits[split][0])} == names, split


def test_members_meta_and_twins(built):
    _, _, splits, table = built
    by_name = {c["name"]: c for c in table}
    for split in toy.SPLITS:
        for key, members in splits[split][0].items():
            assert set(members) == {schema.POS_IMAGE_MEMBERS[0], schema.NEG_IMAGE_MEMBERS[0], schema.META}
            meta = json.loads(members[schema.META])
            assert validate_pair_meta(meta, where=key) == meta
            pos, neg = by_name[meta[schema.POS_CONCEPT]], by_name[meta[schema.NEG_CONCEPT]]
            assert pos["twin"] == neg["name"] and neg["twin"] == pos["name"]
            assert meta[schema.PAIR_ID] == pos["pair_id"] == neg["pair_id"]
            assert meta[schema.CATEGORY] == pos["category"] == neg["category"]
            assert (meta[schema.POS_COUNTRY], meta[schema.NEG_COUNTRY]) == (pos["country"], neg["country"])
            assert meta[schema.POS_CAPTION] in pos["captions"] and meta[schema.NEG_CAPTION] in neg["captions"]
            assert members[schema.POS_IMAGE_MEMBERS[0]] != members[schema.NEG_IMAGE_MEMBERS[0]]


def test_concept_table_and_captions():
    table = toy.concept_table()
    assert len(table) >= 40 and len({c["category"] for c in table}) >= 5 and len({c["country"] for c in table}) >= 15
    assert len({c["name"] for c in table}) == len(table)
    for c in table:
        assert table[2 * c["pair_id"] + (1 - c["side"])]["name"] == c["twin"]
        assert c["detail"] and c["detail"] != c["twin_detail"]
        assert len(set(c["captions"])) >= 5
        for caption in c["captions"]:
            assert c["name"].lower() in caption.lower() and c["detail"] in caption, caption
            assert len(caption.split()) < 15, caption


def test_val_images_are_held_out(built):
    _, _, splits, _ = built
    images = {split: {members[m] for members in splits[split][0].values() for m in
                      (schema.POS_IMAGE_MEMBERS[0], schema.NEG_IMAGE_MEMBERS[0])} for split in toy.SPLITS}
    assert not images["train"] & images["val"]
    assert len(images["train"]) == 2 * len(splits["train"][0])  # every stored image is its own variant


def test_sizes_json_matches_the_shards(built):
    out, summary, splits, _ = built
    for split, min_shards in (("train", 4), ("val", 2)):
        counts = splits[split][1]
        assert read_sizes(out / split) == counts
        assert len(counts) >= min_shards
        assert summary[split]["samples"] == sum(counts.values()) == len(splits[split][0])


def test_same_seed_same_members_other_seed_other_images(tmp_path):
    a = toy.make_toy_shards(tmp_path / "a", seed=5, **TINY)
    b = toy.make_toy_shards(tmp_path / "b", seed=5, **TINY)
    c = toy.make_toy_shards(tmp_path / "c", seed=6, **TINY)
    for split in toy.SPLITS:
        sa, sb, sc = (read_split(Path(s[split]["dir"]))[0] for s in (a, b, c))
        assert sa == sb
        assert sorted(sa) == sorted(sc)  # the keys name (concept, variant), not the seed
        image = schema.POS_IMAGE_MEMBERS[0]
        assert all(sa[k][image] != sc[k][image] for k in sa)
        # the shards are normalised too: even the tar files are byte-identical for a seed
        for shard in read_sizes(a[split]["dir"]):
            assert (Path(a[split]["dir"]) / shard).read_bytes() == (Path(b[split]["dir"]) / shard).read_bytes()


def test_ensure_builds_once_and_repairs(tmp_path):
    out = tmp_path / "toyset"
    assert toy.ensure_toy_shards(out, seed=0, **TINY) == out
    marker = out / toy.MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    shard = sorted((out / "train").glob("shard-*.tar"))[0]
    shard_stamp = shard.stat().st_mtime_ns

    toy.ensure_toy_shards(out, seed=0, **TINY)  # complete: nothing is rebuilt
    assert marker.stat().st_mtime_ns == stamp and shard.stat().st_mtime_ns == shard_stamp

    shutil.rmtree(out / "val")  # a split went missing: rebuilt
    toy.ensure_toy_shards(out, seed=0, **TINY)
    assert sum(read_sizes(out / "val").values()) == toy.toy_summary(out)["val"]["samples"] > 0

    os.utime(marker, ns=(0, 0))
    toy.ensure_toy_shards(out, seed=1, **TINY)  # other parameters: rebuilt
    assert json.loads(marker.read_text())["params"]["seed"] == 1 and marker.stat().st_mtime_ns != 0

    marker.unlink()  # an interrupted build (no marker) never counts as complete
    toy.ensure_toy_shards(out, seed=1, **TINY)
    assert marker.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["toyset"]  # no temporary folders left behind

    (out / "notes.txt").write_text("not ours")
    marker.unlink()
    with pytest.raises(FileExistsError):
        toy.ensure_toy_shards(out, seed=1, **TINY)
    assert (out / "notes.txt").is_file()


def test_cli_prints_the_summary(tmp_path, capsys):
    toy.main(["--out", str(tmp_path / "cli"), "--seed", "3", "--train-variants", "1", "--val-variants", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["seed"] == 3 and summary["train"]["samples"] == summary["concepts"]
    assert Path(summary["train"]["dir"], schema.SIZES_FILE).is_file()


@pytest.mark.slow
def test_default_settings_stay_small(tmp_path):
    summary = toy.make_toy_shards(tmp_path, seed=0)
    total = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert total < 20e6, total
    assert summary["train"]["samples"] == 40 * summary["concepts"]
    assert summary["val"]["samples"] == 8 * summary["concepts"]
    assert summary["train"]["shards"] >= 4 and summary["val"]["shards"] >= 2


def test_an_interrupted_build_leaves_nothing_behind(tmp_path, monkeypatch):
    real, calls = toy.render_concept, []

    def failing(*args, **kwargs):  # dies half-way through the train split
        calls.append(1)
        if len(calls) > 40:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(toy, "render_concept", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        toy.ensure_toy_shards(tmp_path / "toyset", **TINY)
    assert list(tmp_path.iterdir()) == []
