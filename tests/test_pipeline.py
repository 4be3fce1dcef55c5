"""Tests for cultureclip.data.pipeline: tiny shards in tmp_path, open_clip's real transform and BPE."""
import io
import json
import logging
import pickle
import socket
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from cultureclip import schema
from cultureclip.data import pipeline as P
from cultureclip.data.shards import TwinShardWriter

SIZE = 32
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)


# ---------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="module")
def tokenizer():
    def no_network(*args, **kwargs):
        raise AssertionError("the bundled BPE tokenizer must not touch the network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def preprocess():
    return open_clip.image_transform(SIZE, is_train=False)


def png(color):
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), color).save(buf, format="PNG")
    return buf.getvalue()


def pair_images(i):
    """The pair index is the pos image's red and the neg image's green channel (x10)."""
    pos, neg = (10 * i, 0, 200), (0, 10 * i, 50)
    if i % 2:  # odd pairs go through the writer's JPEG encoding, even ones stay PNG
        return Image.new("RGB", (SIZE, SIZE), pos), Image.new("RGB", (SIZE, SIZE), neg)
    return png(pos), png(neg)


def pair_meta(i):
    meta = {schema.POS_CAPTION: f"a photo of pos thing {i}", schema.NEG_CAPTION: f"a photo of neg thing {i}",
            schema.POS_CONCEPT: f"pos concept {i}", schema.NEG_CONCEPT: f"neg concept {i}"}
    if i % 3 == 0:
        meta.update({schema.CATEGORY: "food", schema.POS_COUNTRY: "China", schema.NEG_COUNTRY: "Japan",
                     schema.PAIR_ID: i})
    return meta


def key(i):
    return f"pair{i:04d}"


def write_pairs(folder, indices, per_shard):
    with TwinShardWriter(folder, maxcount=per_shard) as w:
        for i in indices:
            w.write(key(i), *pair_images(i), pair_meta(i))
    return folder


def pixel_index(image, channel):
    """Undo Normalize and read the index back from one channel (JPEG error is a few levels)."""
    value = ((image * STD + MEAN)[channel].mean() * 255).item()
    return round(value / 10)


def build(urls, tokenizer, preprocess, batch_size=4, **kw):
    kw.setdefault("train", False)
    return P.build_twin_pipeline(urls, preprocess, tokenizer, batch_size, **kw)


def keys_of(batches):
    return [k for b in batches for k in b[schema.KEY]]


@pytest.fixture
def shards(tmp_path):
    """10 pairs in shards of 3, 3, 3, 1."""
    return write_pairs(tmp_path / "good", range(10), per_shard=3)


# ---------------------------------------------------------------- batches

def test_batch_shapes_dtypes_and_context_lengths(shards, tokenizer, preprocess):
    batches = list(build(str(shards), tokenizer, preprocess, concept_context_length=16))
    assert [len(b[schema.KEY]) for b in batches] == [4, 4, 2]  # eval keeps the partial batch
    b = batches[0]
    for k in schema.IMAGE_KEYS:
        assert b[k].shape == (4, 3, SIZE, SIZE) and b[k].dtype == torch.float32
    for k in schema.CAPTION_KEYS:
        assert b[k].shape == (4, 77) and b[k].dtype == torch.long
    for k in schema.CONCEPT_KEYS:
        assert b[k].shape == (4, 16) and b[k].dtype == torch.long
    for k in schema.TEXT_KEYS:
        assert isinstance(b[k + schema.TEXT_SUFFIX], list) and len(b[k + schema.TEXT_SUFFIX]) == 4
    assert b[schema.CATEGORY] == ["food", None, None, "food"]
    assert b[schema.PAIR_ID] == [0, None, None, 3]
    assert b[schema.N_SKIPPED] == 0 and isinstance(b[schema.N_SKIPPED], int)

    b = next(iter(build(str(shards), tokenizer, preprocess, caption_context_length=32)))
    assert b[schema.POS_CAPTION].shape == (4, 32) and b[schema.POS_CONCEPT].shape == (4, 77)


def test_twin_pairing_is_preserved(shards, tokenizer, preprocess):
    for b in build(str(shards), tokenizer, preprocess, concept_context_length=16):
        for row, k in enumerate(b[schema.KEY]):
            i = int(k[len("pair"):])
            assert pixel_index(b[schema.POS_IMAGE][row], 0) == i
            assert pixel_index(b[schema.NEG_IMAGE][row], 1) == i
            for field in schema.TEXT_KEYS:
                text = pair_meta(i)[field]
                assert b[field + schema.TEXT_SUFFIX][row] == text
                length = 16 if field in schema.CONCEPT_KEYS else 77
                assert torch.equal(b[field][row], tokenizer([text], context_length=length)[0])


# ---------------------------------------------------------------- evaluation and training streams

def test_eval_pass_sees_every_pair_once_in_order(shards, tokenizer, preprocess):
    expected = [key(i) for i in range(10)]
    pipe = build(str(shards), tokenizer, preprocess)
    assert keys_of(P.make_loader(pipe, num_workers=0)) == expected
    assert keys_of(P.make_loader(pipe, num_workers=0)) == expected  # a second pass, same order

    parallel = [keys_of(P.make_loader(pipe, num_workers=2)) for _ in range(2)]
    assert sorted(parallel[0]) == expected and len(parallel[0]) == 10
    assert parallel[0] == parallel[1]  # workers interleave, but deterministically


def test_train_stream_is_resampled_and_with_epoch_limits_it(shards, tokenizer, preprocess):
    pipe = build(str(shards), tokenizer, preprocess, train=True, shuffle_buffer=8)
    stream = iter(pipe)
    many = [next(stream) for _ in range(8)]  # 32 pairs drawn from 10: the stream does not end
    assert all(len(b[schema.KEY]) == 4 for b in many)
    assert set(keys_of(many)) <= {key(i) for i in range(10)} and len(keys_of(many)) == 32

    loader = P.make_loader(pipe, num_workers=0, epoch_length_batches=5)
    assert loader.num_batches == 5
    assert [len(list(loader)) for _ in range(2)] == [5, 5]

    loader = P.make_loader(pipe, num_workers=2, epoch_length_batches=5)
    assert loader.num_batches == 6  # ceil(5 / 2) batches per worker
    assert len(list(loader)) == 6


def test_train_same_seed_same_batches(shards, tokenizer, preprocess):
    def first_keys(seed, epoch=None):
        pipe = build(str(shards), tokenizer, preprocess, train=True, seed=seed, shuffle_buffer=8)
        if epoch is not None:
            pipe.set_epoch(epoch)
        stream = iter(pipe)
        return keys_of(next(stream) for _ in range(3))

    assert first_keys(0) == first_keys(0) == first_keys(0, epoch=0)
    assert first_keys(0) != first_keys(1)
    assert first_keys(0, epoch=1) != first_keys(0, epoch=0)


def test_ranks_split_eval_shards_and_seed_train_streams(shards, tokenizer, preprocess, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # read by webdataset's split_by_node and worker seeds
    eval_keys, train_keys = [], []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        eval_keys.append(keys_of(build(str(shards), tokenizer, preprocess)))
        stream = iter(build(str(shards), tokenizer, preprocess, train=True, shuffle_buffer=8))
        train_keys.append(keys_of(next(stream) for _ in range(3)))
    assert sorted(eval_keys[0] + eval_keys[1]) == [key(i) for i in range(10)]
    assert not set(eval_keys[0]) & set(eval_keys[1])
    assert train_keys[0] != train_keys[1]
    with pytest.raises(ValueError, match=r"for 3 loader worker\(s\) x 2 rank"):  # world size from the env
        P.make_loader(build(str(shards), tokenizer, preprocess), num_workers=3)


# ---------------------------------------------------------------- broken data

def write_bad_shard(path, good_meta, with_good=True):
    """Garbage pos image, no neg image, json missing a field, bad json; pairs 10 and 11 are good."""
    pos_member, neg_member = schema.POS_IMAGE_MEMBERS[0], schema.NEG_IMAGE_MEMBERS[0]
    incomplete = {k: v for k, v in good_meta(0).items() if k != schema.NEG_CONCEPT}
    samples = [
        {pos_member: png((100, 0, 200)), neg_member: png((0, 100, 50)), schema.META: good_meta(10)},
        {pos_member: b"not an image at all", neg_member: png((0, 0, 0)), schema.META: good_meta(0)},
        {pos_member: png((0, 0, 0)), schema.META: good_meta(0)},
        {pos_member: png((110, 0, 200)), neg_member: png((0, 110, 50)), schema.META: good_meta(11)},
        {pos_member: png((0, 0, 0)), neg_member: png((0, 0, 0)), schema.META: incomplete},
        {pos_member: png((0, 0, 0)), neg_member: png((0, 0, 0)), schema.META: b"{not json"},
    ]
    names = ["pair0010", "badimage", "noneg", "pair0011", "nofield", "badjson"]
    with wds.TarWriter(str(path)) as w:
        for name, sample in zip(names, samples):
            if not with_good and name.startswith("pair"):
                continue
            meta = sample[schema.META]
            sample[schema.META] = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
            w.write({schema.KEY: name, **sample})


def truncate_inside_second_sample(src, dst):
    """Cut ``src`` in the middle of the second sample's last member: the first sample survives,
    the second loses a member, the third is gone."""
    with tarfile.open(src) as tf:
        members = tf.getmembers()
    cut = members[5].offset_data + 100  # 3 members per sample: [5] is the second sample's pos image
    dst.write_bytes(src.read_bytes()[:cut])


@pytest.fixture
def broken(tmp_path):
    """Good shards (pairs 0..5), one shard of bad samples, one truncated shard (pairs 20..22)."""
    folder = write_pairs(tmp_path / "mixed", range(6), per_shard=3)
    write_bad_shard(folder / "shard-000002.tar", pair_meta)
    write_pairs(tmp_path / "trunc", range(20, 23), per_shard=3)
    truncate_inside_second_sample(tmp_path / "trunc" / "shard-000000.tar", folder / "shard-000003.tar")
    good = {key(i) for i in [*range(6), 10, 11, 20]}
    reasons = {P.BAD_IMAGE: 1, P.MISSING_MEMBER: 2, P.BAD_META: 2, P.TRUNCATED_SHARD: 1}
    return folder, good, reasons


def test_broken_samples_are_skipped_counted_and_logged(broken, tokenizer, preprocess, caplog):
    folder, good, reasons = broken
    pipe = build(str(folder), tokenizer, preprocess, batch_size=4)
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        batches = list(P.make_loader(pipe, num_workers=0))
    keys = keys_of(batches)
    assert sorted(keys) == sorted(good)  # every good pair, once; no blank stand-ins
    assert sum(len(b[schema.POS_IMAGE]) for b in batches) == len(good)
    for b in batches:  # real images of the right pair in every row
        for row, k in enumerate(b[schema.KEY]):
            i = int(k[len("pair"):])
            assert pixel_index(b[schema.POS_IMAGE][row], 0) == pixel_index(b[schema.NEG_IMAGE][row], 1) == i
    assert pipe.skip_counter.by_reason == reasons
    assert sum(b[schema.N_SKIPPED] for b in batches) == pipe.skip_counter.total == sum(reasons.values())

    text = caplog.text
    bad, truncated = folder / "shard-000002.tar", folder / "shard-000003.tar"
    for name, url, reason in [("badimage", bad, P.BAD_IMAGE), ("noneg", bad, P.MISSING_MEMBER),
                              ("nofield", bad, P.BAD_META), ("badjson", bad, P.BAD_META),
                              ("pair0021", truncated, P.MISSING_MEMBER)]:
        assert f"skipped sample {name} from {url} ({reason})" in text
    assert f"skipped shard {truncated} ({P.TRUNCATED_SHARD}): cut short" in text
    assert "neg_concept" in text  # the reason names the missing field


def test_broken_samples_counted_across_workers(broken, tokenizer, preprocess):
    folder, good, reasons = broken
    pipe = build(str(folder), tokenizer, preprocess, batch_size=4)
    batches = list(P.make_loader(pipe, num_workers=2))
    assert sorted(keys_of(batches)) == sorted(good)
    assert sum(b[schema.N_SKIPPED] for b in batches) == sum(reasons.values())


def test_skips_after_the_last_good_sample_are_reported(tmp_path, tokenizer, preprocess):
    folder = write_pairs(tmp_path / "s", range(4), per_shard=4)  # exactly one full batch ...
    write_bad_shard(folder / "shard-000001.tar", pair_meta, with_good=False)  # ... then only bad ones
    batches = list(build(str(folder), tokenizer, preprocess, batch_size=4))
    assert len(batches) == 1 and batches[0][schema.N_SKIPPED] == 4


# ---------------------------------------------------------------- shard specs, sizes, checks

def test_expand_shards(tmp_path):
    a = write_pairs(tmp_path / "a", range(7), per_shard=2)  # 4 shards
    b = write_pairs(tmp_path / "b", range(3), per_shard=2)  # 2 shards
    a_all = [str(a / (schema.SHARD_PATTERN % i)) for i in range(4)]
    assert P.expand_shards(str(a / "shard-{000000..000003}.tar")) == a_all
    assert P.expand_shards(str(a)) == a_all
    assert P.expand_shards(str(a / "shard-*.tar")) == a_all
    assert P.expand_shards(f"{a}::{b / 'shard-000001.tar'}") == a_all + [str(b / "shard-000001.tar")]
    assert P.expand_shards([str(b), str(a / "shard-000000.tar")]) == [
        str(b / "shard-000000.tar"), str(b / "shard-000001.tar"), a_all[0]]
    assert P.expand_shards([a_all[0], a_all[0]]) == [a_all[0]]
    assert P.expand_shards("https://host/d/shard-{0..2}.tar::pipe:cat x.tar") == [
        "https://host/d/shard-0.tar", "https://host/d/shard-1.tar", "https://host/d/shard-2.tar", "pipe:cat x.tar"]
    assert P.expand_shards("s3://bucket/x.tar") == ["s3://bucket/x.tar"]

    missing = str(tmp_path / "nowhere" / "shard-*.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        P.expand_shards(missing)
    with pytest.raises(FileNotFoundError, match="000009"):
        P.expand_shards(str(a / "shard-{000000..000009}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        P.expand_shards(str(tmp_path / "empty"))


def test_count_pairs(tmp_path):
    a = write_pairs(tmp_path / "a", range(7), per_shard=2)
    b = write_pairs(tmp_path / "b", range(3), per_shard=2)
    assert P.count_pairs(str(a)) == 7
    assert P.count_pairs(P.expand_shards(f"{a}::{b}")) == 10
    assert P.count_pairs(str(a / "shard-00000{0..1}.tar")) == 4
    assert P.count_pairs(["https://host/shard-0.tar"]) is None
    (b / schema.SIZES_FILE).unlink()
    assert P.count_pairs(str(b)) is None


def test_shard_count_check(shards, tokenizer, preprocess):  # 4 shards
    pipe = build(str(shards), tokenizer, preprocess)
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 5 loader worker\(s\) x 1 rank"):
        P.make_loader(pipe, num_workers=5)
    with pytest.raises(ValueError, match=r"4 shard\(s\) for 3 loader worker\(s\) x 2 rank"):
        build(str(shards), tokenizer, preprocess, num_workers=3, world_size=2)
    with pytest.raises(ValueError, match="epoch_length_batches"):
        P.make_loader(pipe, num_workers=0, epoch_length_batches=3)
    two = build(str(shards / "shard-00000{0..1}.tar"), tokenizer, preprocess)
    P.make_loader(two, num_workers=2)  # exactly enough
    with pytest.raises(ValueError, match=r"2 shard\(s\) for 2 loader worker\(s\) x 2 rank"):
        P.make_loader(two, num_workers=2, world_size=2)
    train = build(str(shards / "shard-000000.tar"), tokenizer, preprocess, train=True)
    loader = P.make_loader(train, num_workers=2, epoch_length_batches=2)  # resampling: any shard count
    assert [len(b[schema.KEY]) for b in loader] == [4, 4]


# ---------------------------------------------------------------- pickling and start methods

def test_pipeline_pickles(shards, tokenizer, preprocess):
    pipe = build(str(shards), tokenizer, preprocess)
    clone = pickle.loads(pickle.dumps(pipe))
    assert keys_of(clone) == keys_of(pipe) == [key(i) for i in range(10)]
    train = build(str(shards), tokenizer, preprocess, train=True)
    pickle.loads(pickle.dumps(train))


@pytest.mark.slow  # spawned loader workers each import torch and open_clip: seconds of start-up
def test_loader_under_spawn(tmp_path, tokenizer, preprocess):
    folder = write_pairs(tmp_path / "s", range(4), per_shard=2)
    pipe = build(str(folder), tokenizer, preprocess, batch_size=2)
    # one worker: spawn re-imports torch and open_clip in every child (~6 s each on CPU)
    loader = P.make_loader(pipe, num_workers=1, persistent_workers=False, multiprocessing_context="spawn")
    assert sorted(keys_of(loader)) == [key(i) for i in range(4)]


# ---------------------------------------------------------------- no progress, skip reports, truncation, images

def write_corrupt_shards(folder, n_shards=2, per_shard=3):
    """Shards whose every sample has an undecodable pos image (and a sizes.json that lists them)."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s in range(n_shards):
        name = schema.SHARD_PATTERN % s
        with wds.TarWriter(str(folder / name)) as w:
            for i in range(per_shard):
                w.write({schema.KEY: f"bad{s}_{i}", schema.POS_IMAGE_MEMBERS[0]: b"garbage",
                         schema.NEG_IMAGE_MEMBERS[0]: png((0, 0, 0)), schema.META: json.dumps(pair_meta(i)).encode()})
        sizes[name] = per_shard
    (folder / schema.SIZES_FILE).write_text(json.dumps(sizes))
    return folder


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["bad_samples", "garbage_tars", "empty_tars"])
def test_train_stream_with_nothing_usable_stops_naming_the_shards(tmp_path, tokenizer, preprocess, damage, caplog):
    folder = write_corrupt_shards(tmp_path / "d")
    for shard in folder.glob("*.tar"):
        if damage == "garbage_tars":
            shard.write_bytes(b"this is not a tar file" * 50)
        elif damage == "empty_tars":
            tarfile.open(shard, "w").close()
    pipe = build(str(folder), tokenizer, preprocess, train=True, shuffle_buffer=8)  # default limit: 1000
    with caplog.at_level(logging.WARNING):
        with pytest.raises(P.NoProgressError, match="no usable twin pair") as err:
            next(iter(pipe))
    assert str(folder / "shard-000000.tar") in str(err.value) and str(folder / "shard-000001.tar") in str(err.value)
    # bounded log: ten single lines plus at most a summary per 1000 skips (and one before raising)
    assert len(caplog.records) <= 10 + 3


@pytest.mark.timeout(60)
def test_no_progress_error_reaches_the_main_process_from_a_worker(tmp_path, tokenizer, preprocess):
    folder = write_corrupt_shards(tmp_path / "d", n_shards=1)
    pipe = build(str(folder), tokenizer, preprocess, train=True, shuffle_buffer=0, max_consecutive_skips=20)
    with pytest.raises(P.NoProgressError, match=r"last 20 samples.*shard-000000.tar"):
        next(iter(P.make_loader(pipe, num_workers=1, epoch_length_batches=4)))


def test_empty_eval_split_yields_a_skip_report(tmp_path, tokenizer, preprocess):
    folder = write_corrupt_shards(tmp_path / "d", n_shards=2, per_shard=3)
    items = list(build(str(folder), tokenizer, preprocess))
    assert items == [{schema.N_SKIPPED: 6}] and schema.is_skip_report(items[0])
    # two workers, one of which only sees bad samples: its count arrives in a skip report
    write_pairs(tmp_path / "g", range(4), per_shard=4)
    (tmp_path / "d" / "shard-000001.tar").unlink()
    urls = [str(tmp_path / "g" / "shard-000000.tar"), str(folder / "shard-000000.tar")]
    items = list(P.make_loader(build(urls, tokenizer, preprocess), num_workers=2))
    assert sum(b[schema.N_SKIPPED] for b in items) == 3 and sum(map(schema.is_skip_report, items)) == 1
    assert sorted(keys_of(b for b in items if not schema.is_skip_report(b))) == [key(i) for i in range(4)]


def test_shard_cut_at_a_member_boundary_is_counted_against_sizes_json(tmp_path, tokenizer, preprocess, caplog):
    folder = write_pairs(tmp_path / "t", range(6), per_shard=6)
    shard = folder / "shard-000000.tar"
    with tarfile.open(shard) as tf:
        cut = tf.getmembers()[9].offset  # 3 members per sample: the header of the 4th sample's first one
    shard.write_bytes(shard.read_bytes()[:cut])
    with caplog.at_level(logging.WARNING):
        batches = list(build(str(folder), tokenizer, preprocess, batch_size=4))
    assert keys_of(batches) == [key(i) for i in range(3)]
    assert sum(b[schema.N_SKIPPED] for b in batches) == 3  # the three missing pairs
    assert f"skipped shard {shard} ({P.TRUNCATED_SHARD}): cut short" in caplog.text
    assert "it holds 3 of the 6 pairs its sizes.json lists" in caplog.text


def test_pixel_cap_and_16bit_images_in_shards(tmp_path, tokenizer):
    gray16 = Image.fromarray(np.full((SIZE, SIZE), 30000, dtype=np.uint16))  # mode I;16
    buf = io.BytesIO()
    gray16.save(buf, format="PNG")
    big = io.BytesIO()
    Image.new("RGB", (100, 100), (9, 9, 9)).save(big, format="PNG")
    with TwinShardWriter(tmp_path / "s", maxcount=10, max_pixels=None) as w:
        w.write("deep", buf.getvalue(), png((0, 0, 0)), pair_meta(1))
        w.write("huge", big.getvalue(), png((0, 0, 0)), pair_meta(2))
    to_tensor = open_clip.image_transform(SIZE, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))
    pipe = build(str(tmp_path / "s"), tokenizer, to_tensor, max_pixels=64 * 64)
    batches = list(pipe)
    assert keys_of(batches) == ["deep"] and pipe.skip_counter.by_reason == {P.TOO_LARGE: 1}
    expected = (30000 >> 8) / 255  # the high byte, not a clipped white 1.0
    assert torch.allclose(batches[0][schema.POS_IMAGE][0], torch.full((3, SIZE, SIZE), expected))


def test_read_concept_names_skips_and_counts_like_the_pipeline(broken, tmp_path):
    from cultureclip.data.datamodule import read_concept_names as from_datamodule
    folder, good, _ = broken
    counter = P.SkipCounter()
    names = P.read_concept_names(str(folder), skip_counter=counter)
    expected = {pair_meta(int(k[len("pair"):]))[f] for k in good for f in schema.CONCEPT_KEYS}
    assert names == sorted(expected) and from_datamodule is P.read_concept_names
    # the json checks only: the undecodable image's pair still names its concepts (pair 0's)
    assert counter.by_reason == {P.MISSING_MEMBER: 2, P.BAD_META: 2, P.TRUNCATED_SHARD: 1}
    bad = write_corrupt_shards(tmp_path / "bad")
    for shard in bad.glob("*.tar"):
        shard.write_bytes(b"damaged" * 100)
    with pytest.raises(ValueError, match=r"the val split has no usable twin pair: 2 shard\(s\) .*shard-000000.tar"):
        P.read_concept_names(str(bad), split="val")
