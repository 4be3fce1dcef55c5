"""tools/make_shards.py on the reference pipeline's final rows keeps category (nested under metadata),
contexts and features, so per-category evaluation of converted data has its categories."""
from __future__ import annotations

import json
import tarfile

import pytest
import torch
from conftest import TINY_VIT
from PIL import Image

from cultureclip import CultureCLIP, schema
from cultureclip.data.convert import convert_to_shards
from cultureclip.data.pipeline import build_twin_pipeline
from cultureclip.data.shards import RecordError
from cultureclip.eval import twins as T

PAIRS = [("Bibimbap", "Nasi campur", "Cuisine"), ("Hanbok", "Kimono", "Clothing"),
         ("Pho", "Laksa", "Cuisine"), ("Sari", "Kebaya", "Clothing"), ("Pagoda", "Stupa", "Architecture")]


def final_row(i, pos, neg, category, root):
    """A reference *final* row: render input plus image paths; category and features under metadata."""
    g = torch.Generator().manual_seed(i)
    for side in ("p", "n"):
        pixels = (torch.rand(24, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{side}{i}.png")
    return {schema.REF_SAMPLE_ID: i, schema.REF_POS_CAPTION_ID: 0, schema.REF_NEG_CAPTION_ID: 0,
            schema.POS_IMAGE_PATH: f"p{i}.png", schema.NEG_IMAGE_PATH: f"n{i}.png",
            schema.POS_CONCEPT: pos, schema.NEG_CONCEPT: neg, schema.POS_CAPTION: f"a photo of {pos}",
            schema.NEG_CAPTION: f"a photo of {neg}", schema.POS_CONTEXT: f"{pos} context",
            schema.NEG_CONTEXT: "" if i == 0 else f"{neg} context",
            schema.REF_METADATA: {schema.CATEGORY: category, schema.POS_FEATURES: f"{pos} look",
                                  schema.NEG_FEATURES: [f"{neg} a", f"{neg} b"]}}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    rows = [final_row(i, *p, root) for i, p in enumerate(PAIRS)]
    (root / "final.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convert_to_shards([root / "final.jsonl"], root / "val", maxcount=2)
    return root, rows


def test_converted_meta_keeps_category_contexts_features(converted):
    root, rows = converted
    metas = {}
    for shard in sorted((root / "val").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith("." + schema.META):
                    metas[m.name.split(".")[0]] = json.loads(tar.extractfile(m).read())
    assert len(metas) == len(rows)
    first = metas["pair000000000"]
    assert first == {schema.POS_CAPTION: "a photo of Bibimbap", schema.NEG_CAPTION: "a photo of Nasi campur",
                     schema.POS_CONCEPT: "Bibimbap", schema.NEG_CONCEPT: "Nasi campur", schema.CATEGORY: "Cuisine",
                     schema.POS_CONTEXT: "Bibimbap context", schema.POS_FEATURES: ["Bibimbap look"],
                     schema.NEG_FEATURES: ["Nasi campur a", "Nasi campur b"]}  # blank neg_context left out
    assert metas["pair000000004"][schema.CATEGORY] == "Architecture"


def test_per_category_evaluation_of_converted_data(converted):
    root, rows = converted
    torch.manual_seed(0)
    model = CultureCLIP.from_config(TINY_VIT, name="tiny-vit-convert")
    pipe = build_twin_pipeline(str(root / "val" / "shard-{000000..000002}.tar"), model.preprocess_val,
                               model.tokenizer, batch_size=2, train=False)
    emb = T.embed_twin_split(model, pipe, amp=False)
    m = T.twin_metrics(emb, groups=(schema.CATEGORY,))
    outcomes = T.per_image_outcomes(emb)["twin_acc"]  # [2P], rows interleaved pos/neg per pair
    # the category of each image from the input rows (by pair key), not from what the pipeline carried
    category_of = {f"pair{i:09d}": r[schema.REF_METADATA][schema.CATEGORY] for i, r in enumerate(rows)}
    for category in ("Cuisine", "Clothing", "Architecture"):
        mask = torch.tensor([category_of[k] == category for k in emb.keys])
        assert m[f"n/category={category}"] == int(mask.sum()) == 2 * sum(p[2] == category for p in PAIRS)
        assert m[f"twin_acc/category={category}"] == pytest.approx(float(outcomes[mask].mean()))


def test_bad_metadata_names_line_and_field(tmp_path):
    row = final_row(0, *PAIRS[0], tmp_path)
    row[schema.REF_METADATA][schema.POS_FEATURES] = {"not": "a list"}
    (tmp_path / "f.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"f\.jsonl:1: metadata: field 'pos_features'"):
        convert_to_shards([tmp_path / "f.jsonl"], tmp_path / "out")
    row[schema.REF_METADATA] = {schema.CATEGORY: 7}
    (tmp_path / "f.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=r"f\.jsonl:1: metadata: field 'category'"):
        convert_to_shards([tmp_path / "f.jsonl"], tmp_path / "out")
