"""Image sources for classification and retrieval: folders and CSV files, batched by a DataLoader.

A source is first *listed* into an :class:`ImageSet` (paths, integer labels or ``None``, ids, class
names), cheaply and with every configuration error raised up front, naming the folder or CSV line.
:class:`ImageBatches` then decodes it in a ``torch.utils.data.DataLoader`` and yields
``(pixels [b, 3, H, W], labels [b] or None, ids)``.

Sources understood by :func:`open_images`:

- ``DIR`` with one sub-folder per class (ImageNet / torchvision ``ImageFolder`` layout): the folder
  name is looked up in the class list; a folder that is not in it is an error naming it.
- ``DIR`` holding images directly (no sub-folders): unlabelled.
- ``FILE.csv`` with a header ``path,label`` (``label`` optional); paths are relative to the CSV's folder.
- ``PREFIX:REST`` for a prefix registered with :func:`register_image_source` (your own lister).

:class:`ImageBatches` is the one batched decoding path of evaluation (classification, retrieval and
the multiple-choice benchmarks). Images are decoded by :mod:`cultureclip.images` (pixel cap, 8-bit
RGB); one that cannot be used is never replaced: it is skipped, counted by reason and listed in
``ImageBatches.skipped`` as ``(name, error)``, or raises :class:`ImageDecodeError` with
``on_error="raise"``. Decoding errors are caught inside the workers and raised (if asked) in the main
process, so the behaviour is the same for ``num_workers=0`` and ``> 0``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from cultureclip.images import (  # noqa: F401  (ImageDecodeError: re-exported, the error of this module)
    DEFAULT_MAX_PIXELS, ImageDecodeError, SkipCounter, check_on_error, decode_image, source_name)
from cultureclip.progress import track

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

Classes = Union[Sequence[str], Mapping[str, int], None]


@dataclass
class ImageSet:
    """A listed image source.

    Attributes:
        paths: absolute (or as given) file paths, in a fixed order.
        labels: class index per path, or ``None`` for an unlabelled source.
        ids: a short stable name per image (its path relative to the folder or CSV), for reports.
        classnames: the class list the labels index into (``None`` when unlabelled and none given).
        source: the folder or file the set was listed from.
    """

    paths: list[str]
    labels: Optional[list[int]]
    ids: list[str]
    classnames: Optional[list[str]]
    source: str

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_index(classes: Classes, names: Sequence[str], where: str) -> tuple[dict[str, int], list[str]]:
    """``name -> index`` and the class list; ``classes=None`` means sorted ``names`` (ImageFolder order)."""
    if classes is None:
        ordered = sorted(set(names))
        return {c: i for i, c in enumerate(ordered)}, ordered
    if isinstance(classes, Mapping):
        return dict(classes), None  # type: ignore[return-value]  # caller knows its class list
    classes = list(classes)
    index: dict[str, int] = {}
    ambiguous = set()
    for i, c in enumerate(classes):
        if c in index:
            ambiguous.add(c)
        index.setdefault(c, i)
    used = ambiguous & set(names)
    if used:
        # e.g. ImageNet's OpenAI names hold "missile" and "sunglasses" twice: a label cannot pick one
        raise ValueError(f"{where}: labels {sorted(used)} occur more than once in the class list, so they "
                         f"cannot be mapped to one class; map folders by id instead")
    return index, classes


def folder_images(root: Union[str, os.PathLike], classes: Classes = None) -> ImageSet:
    """List an ImageNet-style class-folder tree, or a flat folder of images.

    Args:
        root: the folder.
        classes: for class folders: the class list (a folder's name must be one of its entries), a
            mapping ``folder name -> class index`` (e.g. WordNet id -> index), or ``None`` to use the
            sorted folder names as classes (torchvision ``ImageFolder``). Ignored for a flat folder,
            except that a list given is kept as ``classnames``.

    Returns:
        An :class:`ImageSet`; images are sorted by path so runs are repeatable.

    Raises:
        FileNotFoundError: ``root`` is not a folder. ValueError: no images, images mixed with class
        folders, or a class folder that is not in ``classes``.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"image folder {root_path} does not exist")
    entries = sorted(os.scandir(root_path), key=lambda e: e.name)
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    top_images = [e.name for e in entries if e.is_file() and _is_image(e.name)]
    if subdirs and top_images:
        raise ValueError(f"{root_path} holds both images and sub-folders ({subdirs[:3]}...); use either "
                         f"one folder per class or a flat folder of images")
    if not subdirs:
        if not top_images:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {root_path}")
        names = None if classes is None or isinstance(classes, Mapping) else list(classes)
        return ImageSet([str(root_path / n) for n in top_images], None, top_images, names, str(root_path))
    index, classnames = _class_index(classes, subdirs, str(root_path))
    unknown = [d for d in subdirs if d not in index]
    if unknown:
        raise ValueError(f"class folders not in the class list: {unknown[:10]} (in {root_path}); a folder "
                         f"name must equal a class name exactly, or give a mapping file")
    paths, labels, ids = [], [], []
    for d in subdirs:
        # walk recursively: some ImageNet copies nest images one level deeper
        for dirpath, dirnames, files in os.walk(root_path / d):
            dirnames.sort()
            for f in sorted(files):
                if _is_image(f):
                    p = Path(dirpath) / f
                    paths.append(str(p))
                    labels.append(index[d])
                    ids.append(p.relative_to(root_path).as_posix())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root_path}")
    return ImageSet(paths, labels, ids, classnames, str(root_path))


def csv_images(csv_path: Union[str, os.PathLike], classes: Classes = None) -> ImageSet:
    """List images from a CSV with a header ``path,label`` (``label`` optional).

    Paths are relative to the CSV's folder (absolute paths are kept). Every error names the CSV
    line: a missing ``path`` column, an empty path, a file that does not exist, an empty or unknown
    label. ``classes=None`` with a label column uses the sorted distinct labels as classes.
    """
    csv_path = Path(csv_path)
    base = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise ValueError(f"{csv_path}:1: header must have a 'path' column (and optionally 'label'), "
                             f"got {header}")
        reader.fieldnames = header
        rows = [(reader.line_num, r) for r in reader]
    has_label = "label" in header
    paths, raw_labels, ids = [], [], []
    for line, row in rows:
        rel = (row.get("path") or "").strip()
        if not rel:
            raise ValueError(f"{csv_path}:{line}: empty path")
        p = Path(rel) if os.path.isabs(rel) else base / rel
        if not p.is_file():
            raise FileNotFoundError(f"{csv_path}:{line}: image {p} does not exist")
        if has_label:
            label = (row.get("label") or "").strip()
            if not label:
                raise ValueError(f"{csv_path}:{line}: empty label (leave out the column for unlabelled images)")
            raw_labels.append((line, label))
        paths.append(str(p))
        ids.append(rel)
    if not paths:
        raise ValueError(f"{csv_path}: no rows")
    if not has_label:
        names = None if classes is None or isinstance(classes, Mapping) else list(classes)
        return ImageSet(paths, None, ids, names, str(csv_path))
    index, classnames = _class_index(classes, [lab for _, lab in raw_labels], str(csv_path))
    for line, label in raw_labels:
        if label not in index:
            raise ValueError(f"{csv_path}:{line}: unknown label {label!r} (not in the class list)")
    return ImageSet(paths, [index[lab] for _, lab in raw_labels], ids, classnames, str(csv_path))


# Extension point: "PREFIX:rest" sources listed by a user's function
_SOURCES: dict[str, Callable[[str, Classes], ImageSet]] = {}


def register_image_source(prefix: str, lister: Callable[[str, Classes], ImageSet]) -> None:
    """Make ``open_images("PREFIX:rest", classes)`` call ``lister("rest", classes)``.

    The lister must return an :class:`ImageSet`; its ``paths`` may hold any source that
    :func:`cultureclip.images.decode_image` reads (paths, bytes, PIL images).
    """
    _SOURCES[prefix] = lister


def open_images(spec: Union[str, os.PathLike, ImageSet], classes: Classes = None) -> ImageSet:
    """List an image source: an :class:`ImageSet`, ``PREFIX:rest``, a ``.csv`` file or a folder."""
    if isinstance(spec, ImageSet):
        return spec
    text = str(spec)
    prefix, sep, rest = text.partition(":")
    # a one-letter prefix is a Windows drive, not a source type
    if sep and len(prefix) > 1 and not os.path.exists(text):
        if prefix in _SOURCES:
            return _SOURCES[prefix](rest, classes)
        raise ValueError(f"unknown image source prefix {prefix!r} in {text!r}; known: {sorted(_SOURCES)}")
    if text.lower().endswith(".csv"):
        return csv_images(text, classes)
    return folder_images(text, classes)


class DecodedImages(Dataset):
    """Decode (:func:`cultureclip.images.decode_image`) and transform one image per index.

    ``__getitem__`` returns ``(index, pixels or None, ImageDecodeError or None)``: a decoding failure
    comes back as a value, so that the caller decides (in the main process) whether to skip or
    raise, the same for ``num_workers=0`` and ``> 0``. The transform runs outside that: a failing
    transform is a bug, not a bad image. ``transform=None`` only checks that the images decode.
    """

    def __init__(self, sources: Sequence[Any], transform: Optional[Callable] = None,
                 names: Optional[Sequence[str]] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> None:
        self.sources, self.transform, self.names, self.max_pixels = sources, transform, names, max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            image = decode_image(self.sources[i], self.names[i] if self.names else None, self.max_pixels)
        except ImageDecodeError as exc:
            return i, None, exc
        return i, (self.transform(image) if self.transform is not None else None), None


def collate_decoded(samples: list) -> tuple[list[int], Optional[torch.Tensor], list[tuple[int, ImageDecodeError]]]:
    """``(indices of decoded images, pixels [b, 3, H, W] or None, [(index, error), ...])``."""
    ok = [(i, x) for i, x, err in samples if err is None]
    pixels = torch.stack([x for _, x in ok]) if ok and ok[0][1] is not None else None
    return [i for i, _ in ok], pixels, [(i, err) for i, _, err in samples if err is not None]


class ImageBatches:
    """Decode images in a ``DataLoader``, in order, skipping or raising on the ones that fail.

    Iterating yields ``(pixels [b, 3, H, W], labels [b] or None, ids)`` for an :class:`ImageSet`;
    :meth:`indexed` yields ``(indices, pixels)`` for any sources; a batch whose images all failed is
    not yielded. ``skipped`` lists ``(name, error)``, ``failed`` maps index -> error, ``counter``
    counts by reason (``bad_image``, ``too_large``); all are reset per pass.

    Args:
        images: an :class:`ImageSet`, or a sequence of sources (paths, bytes, PIL images, HF image dicts).
        transform: PIL image -> tensor (the model's ``preprocess_val``); None: decode only.
        batch_size, num_workers: as for ``torch.utils.data.DataLoader``.
        on_error: ``"skip"`` (count and list) or ``"raise"`` (:class:`ImageDecodeError` naming the image).
        names: how messages name each image (default: the path, or the source kind).
        max_pixels: pixel cap per image (:mod:`cultureclip.images`); a larger image fails as ``too_large``.
        progress: what a pass is called in its progress bar or lines (:mod:`cultureclip.progress`); None: none.
    """

    def __init__(self, images: Union[ImageSet, Sequence[Any]], transform: Optional[Callable] = None,
                 batch_size: int = 64, num_workers: int = 0, on_error: str = "skip",
                 names: Optional[Sequence[str]] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
                 progress: Optional[str] = "images") -> None:
        check_on_error(on_error)
        self.images = images if isinstance(images, ImageSet) else None
        sources = images.paths if isinstance(images, ImageSet) else list(images)
        self.names = list(names) if names is not None else [source_name(x) for x in sources]
        self.on_error, self.progress = on_error, progress
        self.loader = DataLoader(DecodedImages(sources, transform, self.names, max_pixels), batch_size=batch_size,
                                 shuffle=False, num_workers=num_workers, collate_fn=collate_decoded,
                                 pin_memory=False, persistent_workers=False)
        self.skipped: list[tuple[str, str]] = []
        self.failed: dict[int, str] = {}
        self.counter = SkipCounter()

    def __len__(self) -> int:
        return len(self.loader)

    def indexed(self) -> Iterator[tuple[list[int], Optional[torch.Tensor]]]:
        """Yield ``(indices, pixels [b, 3, H, W] or None)`` over the decodable images, in order."""
        self.skipped, self.failed, self.counter = [], {}, SkipCounter()
        batches = track(self.loader, self.progress or "", unit="batches", summary=False,
                        mode=None if self.progress else "off")
        for indices, pixels, failures in batches:
            for i, err in failures:
                if self.on_error == "raise":
                    raise err
                self.skipped.append((self.names[i], err.detail))
                self.failed[i] = err.detail
                self.counter.add(err.reason, self.names[i], err.detail)
            if indices:
                yield indices, pixels
        self.counter.flush()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor], list[str]]]:
        if self.images is None:
            raise TypeError("iterate ImageBatches over plain sources with .indexed()")
        labels = self.images.labels
        for indices, pixels in self.indexed():
            y = None if labels is None else torch.tensor([labels[i] for i in indices], dtype=torch.long)
            yield pixels, y, [self.images.ids[i] for i in indices]
