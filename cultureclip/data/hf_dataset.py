"""Twin-pair shards <-> a Hugging Face ``datasets`` folder (Parquet with ``Image`` columns and a dataset card).

The folder is what the Hub's dataset viewer and ``datasets.load_dataset(folder)`` read::

    README.md                                  dataset card: YAML front matter (license, task categories,
                                               languages, size category, the splits' files) + markdown
    data/train-00000-of-00002.parquet          one Parquet file per shard, one row per pair
    data/val-00000-of-00001.parquet
    card/...                                   the card's plots and thumbnails, when it has any

Columns (names from :mod:`cultureclip.schema`): ``sample_key`` (the pair's WebDataset key),
``pos_image`` and ``neg_image`` (``datasets.Image``: the file bytes exactly as in the shards, and the
member name, whose extension says the format), the pair's json fields (absent ones are null), and,
for curated data, the judge's answer for each image (``pos_authenticity``, ..., ``neg_picks_own``).

:func:`write_hf_dataset` makes the folder from shard folders; :func:`hf_to_shards` turns it (or any
dataset with these columns) back into shards with the same keys, image bytes and fields.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from cultureclip import schema
from cultureclip.data.shards import TwinShardWriter, read_sizes

PathLike = Union[str, os.PathLike]
META_FIELDS = schema.REQUIRED_TEXT_FIELDS + schema.OPTIONAL_FIELDS
LIST_FIELDS = (schema.POS_FEATURES, schema.NEG_FEATURES)
INT_JUDGE_FIELDS = schema.SCORES
TASK_CATEGORIES = ["zero-shot-image-classification", "image-classification", "text-to-image"]
TAGS = ["clip", "contrastive-learning", "hard-negatives", "culture", "synthetic", "webdataset"]


def _require_datasets():
    try:
        import datasets  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise ImportError(f"the Hugging Face dataset format needs datasets and pyarrow ({exc}): "
                          f"pip install 'cultureclip[curate]'") from exc
    import datasets
    return datasets


def features(judge: bool):
    """The ``datasets.Features`` of the folder's rows (``judge``: with the judge's columns)."""
    ds = _require_datasets()
    string_list = ds.List(ds.Value("string")) if hasattr(ds, "List") else ds.Sequence(ds.Value("string"))
    cols: dict[str, Any] = {schema.HF_SAMPLE_KEY: ds.Value("string"), schema.POS_IMAGE: ds.Image(),
                            schema.NEG_IMAGE: ds.Image()}
    cols.update({f: string_list if f in LIST_FIELDS else ds.Value("string") for f in META_FIELDS})
    if judge:
        for col in schema.HF_JUDGE_COLUMNS:
            field = col.split("_", 1)[1]
            cols[col] = ds.Value("int32") if field in INT_JUDGE_FIELDS else (
                ds.Value("bool") if field == schema.PICKS_OWN else ds.Value("string"))
    return ds.Features(cols)


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket for ``n`` rows."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>1T" if n > 10 ** 12 else "10M<n<100M" if n < 10 ** 8 else "100M<n<1B" if n < 10 ** 9 else "1B<n<10B"


def dataset_card(body: str, splits: Mapping[str, int], license: str = "other", languages: Sequence[str] = ("en",),
                 pretty_name: Optional[str] = None, standins: Sequence[str] = ()) -> str:
    """``README.md`` text: the Hub's YAML front matter, a stand-in warning when any was used, then ``body``."""
    from huggingface_hub import DatasetCardData
    data = DatasetCardData(
        license=license, language=list(languages), task_categories=TASK_CATEGORIES, tags=TAGS,
        size_categories=[size_category(sum(splits.values()))], pretty_name=pretty_name,
        configs=[{"config_name": "default", "data_files": [
            {"split": split, "path": f"{schema.HF_DATA_DIR}/{split}-*.parquet"} for split in splits]}])
    head = ["Twin-pair data for contrastive fine-tuning (CultureCLIP): each row holds two images of two concepts "
            "from different cultures that look alike, with a caption and the concept name of each. Rows: "
            + ", ".join(f"{split} {n}" for split, n in splits.items()) + ". Load it with "
            "`datasets.load_dataset(<this folder or repo id>)`; the images are the `pos_image` and `neg_image` "
            "columns, the judge's scores of each image the `pos_*`/`neg_*` score columns.", ""]
    if standins:
        head += [f"**Made with stand-ins, not real models: {', '.join(standins)}.** Their images are noise and "
                 "their answers are not judgements; this dataset exercises the pipeline and means nothing.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(head) + "\n" + body.lstrip("\n").replace(
        "# Twin-pair dataset card", "## The curation run", 1)


def write_hf_dataset(shard_root: PathLike, out_dir: PathLike, splits: Sequence[str] = ("train", "val"),
                     judge: Optional[Mapping[str, Mapping[str, Any]]] = None, card_body: str = "",
                     card_assets: Optional[PathLike] = None, license: str = "other",
                     languages: Sequence[str] = ("en",), standins: Sequence[str] = ()) -> dict[str, int]:
    """Write the Hugging Face folder ``out_dir`` from the shard folders ``shard_root/<split>``.

    Args:
        shard_root: holds one shard folder (shards + ``sizes.json``) per split.
        out_dir: the dataset folder to make; it must not exist yet.
        splits: split folder names, kept as the dataset's split names; a missing or empty one is left out.
        judge: ``{pair_id: {column: value}}`` with the :data:`~cultureclip.schema.HF_JUDGE_COLUMNS` of
            each pair (curated data); None writes no judge columns.
        card_body: markdown after the card's front matter and summary (the export's ``card.md``).
        card_assets: a folder copied in as ``card/`` (the plots and thumbnails the body links to).
        license, languages, standins: for the card (see :func:`dataset_card`).

    Returns:
        ``{split: rows}``.
    """
    _require_datasets()
    import pyarrow as pa
    import pyarrow.parquet as pq
    shard_root, out_dir = Path(shard_root), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; the dataset folder is written fresh")
    schema_ = features(judge is not None).arrow_schema
    counts: dict[str, int] = {}
    data = out_dir / schema.HF_DATA_DIR
    data.mkdir(parents=True)
    for split in splits:
        folder = shard_root / split
        sizes = read_sizes(folder) if (folder / schema.SIZES_FILE).is_file() else {}
        names = sorted(n for n, count in sizes.items() if count > 0)
        for i, name in enumerate(names):
            rows = []
            for key, pos_m, pos_b, neg_m, neg_b, meta in iter_shard_pairs_of(folder, name):
                row = {schema.HF_SAMPLE_KEY: key, schema.POS_IMAGE: {"bytes": pos_b, "path": f"{key}.{pos_m}"},
                       schema.NEG_IMAGE: {"bytes": neg_b, "path": f"{key}.{neg_m}"},
                       **{f: meta.get(f) for f in META_FIELDS}}
                if judge is not None:
                    scores = judge.get(str(meta.get(schema.PAIR_ID)))
                    if scores is None:
                        raise ValueError(f"{folder / name}: pair {key!r} (pair_id {meta.get(schema.PAIR_ID)!r}) has "
                                         f"no judge record")
                    row.update({c: scores[c] for c in schema.HF_JUDGE_COLUMNS})
                rows.append(row)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema_),
                           data / f"{split}-{i:05d}-of-{len(names):05d}.parquet")
            counts[split] = counts.get(split, 0) + len(rows)
    if card_assets is not None and Path(card_assets).is_dir():
        shutil.copytree(card_assets, out_dir / Path(card_assets).name)
    (out_dir / schema.HF_CARD).write_text(dataset_card(card_body, counts, license, languages, standins=standins))
    return counts


def iter_shard_pairs_of(folder: Path, name: str) -> Iterator[tuple[str, str, bytes, str, bytes, dict]]:
    """``(key, pos member, pos bytes, neg member, bytes, meta)`` of every pair of the shard ``folder/name``,
    in shard order, read as training reads it (the end-of-archive and ``sizes.json`` checks included), with
    the meta exactly as stored.

    Raises:
        ShardDamage: the shard is cut short or damaged (a ValueError naming it).
        ValueError: a sample without both images or its json (the shard is not a twin shard).
    """
    from cultureclip.data.pipeline import listed_sizes
    from cultureclip.data.stages import SkipCounter, TarSamples, _Skip, split_pair
    url = str(folder / name)
    for raw in TarSamples(SkipCounter(), listed_sizes([url]), on_error="raise")([{"url": url}]):
        try:
            (pos, pos_b), (neg, neg_b), _ = split_pair(raw)
        except _Skip as skip:
            raise ValueError(f"{url}: sample {raw[schema.KEY]!r}: {skip.args[1]}") from skip
        yield raw[schema.KEY], pos, pos_b, neg, neg_b, json.loads(raw[schema.META])


def is_hf_dataset(path: PathLike) -> bool:
    """Whether ``path`` is a dataset folder (a ``README.md`` or Parquet files under ``data/``)."""
    path = Path(path)
    return path.is_dir() and ((path / schema.HF_CARD).is_file() or any((path / schema.HF_DATA_DIR).glob("*.parquet")))


def _image_bytes(value: Any, where: str) -> tuple[bytes, Optional[str]]:
    if not isinstance(value, Mapping) or not value.get("bytes"):
        raise ValueError(f"{where}: no image bytes (a dataset whose images are only paths cannot be converted)")
    return value["bytes"], value.get("path")


def hf_to_shards(folder: PathLike, out_dir: PathLike, maxcount: int = 1000, overwrite: bool = False) -> dict[str, int]:
    """Turn a dataset folder (:func:`write_hf_dataset`'s, or any with its columns) into ``out_dir/<split>`` shards.

    Keys, image bytes and fields come back unchanged (a null field is left out of the pair's json, as the
    export does). Returns ``{split: pairs}``.

    Raises:
        FileExistsError: a split folder already holds shards and ``overwrite`` is False.
        ValueError: a row without image bytes or a required field (named by split and row).
    """
    ds = _require_datasets()
    out_dir = Path(out_dir)
    cache = Path(tempfile.mkdtemp(prefix=".hf-cache-", dir=out_dir if out_dir.is_dir() else None))
    try:
        loaded = ds.load_dataset(str(folder), cache_dir=str(cache))
        counts = {}
        for split, table in loaded.items():
            for col in (schema.POS_IMAGE, schema.NEG_IMAGE):
                table = table.cast_column(col, ds.Image(decode=False))  # the stored bytes, not decoded pixels
            dest = out_dir / split
            if (dest / schema.SIZES_FILE).exists() and not overwrite:
                raise FileExistsError(f"{dest} already holds shards; pass overwrite to replace them")
            if dest.exists() and overwrite:
                shutil.rmtree(dest)
            with TwinShardWriter(dest, maxcount=maxcount) as writer:
                for i, row in enumerate(table):
                    where = f"{folder} split {split} row {i}"
                    key = row.get(schema.HF_SAMPLE_KEY) or f"pair{i:09d}"
                    pos, _ = _image_bytes(row[schema.POS_IMAGE], f"{where}: {schema.POS_IMAGE}")
                    neg, _ = _image_bytes(row[schema.NEG_IMAGE], f"{where}: {schema.NEG_IMAGE}")
                    meta = {f: row[f] for f in META_FIELDS if row.get(f) is not None}
                    writer.write(key, pos, neg, meta)
            for path in dest.glob("shard-*.tar"):  # webdataset opens its first shard eagerly: drop it if empty
                if path.name not in writer.sizes:
                    path.unlink()
            counts[split] = sum(writer.sizes.values())
        return counts
    finally:
        shutil.rmtree(cache, ignore_errors=True)
