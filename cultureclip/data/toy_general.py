"""A toy *general* image-text set: plain coloured shapes, the stand-in for CC3M/LAION-style data.

The twin set (:mod:`cultureclip.data.toy`) teaches fine cultural details; this one holds what a
model should *not* forget meanwhile: 12 everyday shapes (circle, star, heart, ...) in 8 colours,
each a fresh random variant (position, size, rotation, palette jitter, a plain light background
and pixel noise), captioned in plain words ("a small red star"). It serves two purposes:

* ``train/``: open_clip-layout WebDataset shards (``<key>.jpg`` + ``<key>.txt``, ``sizes.json``),
  the replay stream of ``data.replay`` and the "pre-training" data of the forgetting benchmark;
* ``eval/<colour>/*.png`` with ``classnames.txt`` and ``templates.txt``: a held-out zero-shot
  classification set (separate random stream) over the 8 colour names, prompts ensembled over the
  shapes ("a {c} star"), scored with the ImageNet zero-shot code
  (:func:`cultureclip.eval.general.imagenet_zeroshot`, task ``cultureclip.eval.tasks.toy_general``).
  Colour naming is the general skill a tiny model learns from scratch in a few hundred CPU steps
  (shape naming takes far longer), which is what the replay benchmark needs.

Like the twin set it is synthetic: it shows whether replay keeps a skill, not how much real
zero-shot accuracy a real model keeps. CLI: ``python -m cultureclip.data.toy_general --out DIR``.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from cultureclip import schema
from cultureclip.data.shards import SHARD_MTIME
from cultureclip.data.toy import _noise_bank, build_in_place
from cultureclip.images import image_to_bytes

GENERAL_VERSION = 3  # bump whenever the drawings change, so cached sets are rebuilt
MARKER_FILE = "general_complete.json"
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
_OWNED = {"train", "eval", CLASSNAMES_FILE, TEMPLATES_FILE, MARKER_FILE}
COLOURS = {"red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 40), "green": (40, 160, 60),
           "blue": (40, 80, 210), "purple": (130, 50, 170), "pink": (240, 120, 180), "black": (25, 25, 25)}
CAPTION_TEMPLATES = ("a {colour} {shape}", "a {size} {colour} {shape}", "a drawing of a {colour} {shape}",
                     "a {shape} in {colour}", "a {size} {shape}, coloured {colour}", "a picture of a {shape}")
# zero-shot over the colour names, the prompts ensembled over the shapes ("a {c} circle", "a {c} star", ...)


def _poly(points):
    return [("poly", tuple(v for p in points for v in p))]


def _regular(n, r, start=-90.0):
    return [(50 + r * math.cos(math.radians(start + 360 * i / n)), 50 + r * math.sin(math.radians(start + 360 * i / n)))
            for i in range(n)]


# shape name -> drawing ops in a 100 x 100 frame: ("poly", xy...), ("ell", box), ("ring", box, width),
# ("line", xy..., width) and ("cut", box) (a hole: the background shows through)
SHAPES = {
    "circle": [("ell", (14, 14, 86, 86))],
    "square": _poly([(18, 18), (82, 18), (82, 82), (18, 82)]),
    "triangle": _poly(_regular(3, 42, -90)),
    "star": _poly([p for i in range(5) for p in (_regular(5, 44)[i], _regular(5, 18, -54)[i])]),
    "cross": _poly([(40, 12), (60, 12), (60, 40), (88, 40), (88, 60), (60, 60), (60, 88), (40, 88), (40, 60),
                    (12, 60), (12, 40), (40, 40)]),
    "ring": [("ring", (14, 14, 86, 86), 12)],
    "diamond": _poly([(50, 8), (80, 50), (50, 92), (20, 50)]),
    "crescent": [("ell", (12, 12, 88, 88)), ("cut", (32, 4, 100, 80))],
    "hexagon": _poly(_regular(6, 42, 0)),
    "arrow": _poly([(10, 40), (58, 40), (58, 20), (92, 50), (58, 80), (58, 60), (10, 60)]),
    "heart": [("ell", (14, 18, 52, 56)), ("ell", (48, 18, 86, 56)), ("poly", (16, 44, 84, 44, 50, 88))],
    "zigzag": [("line", (10, 70, 30, 30, 50, 70, 70, 30, 90, 70), 10)],
}
_SPLIT_CODE = {"train": 11, "eval": 12}  # apart from the twin set's codes: no shared random stream


def render_shape(shape: str, colour: str, rng: np.random.Generator, image_size: int = 64) -> tuple[Image.Image, str]:
    """One random variant of ``shape`` in ``colour``; returns ``(RGB image, size word)``."""
    big = 2 * image_size
    scale = rng.uniform(0.35, 0.85)
    size_word = "small" if scale < 0.6 else "large"
    theta = math.radians(rng.uniform(-25, 25))
    cx, cy = rng.uniform(scale * big / 2, big - scale * big / 2, 2)
    k = scale * big / 100

    def tr(xs):  # frame coordinates -> rotated, scaled, moved pixel coordinates
        pts = np.asarray(xs, float).reshape(-1, 2) - 50 + rng.normal(0, 1.0, (len(xs) // 2, 2))
        rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
        return (pts @ rot.T * k + (cx, cy)).ravel().tolist()

    def box(b):  # ellipses keep their axes: only the centre and size follow the transform
        (x0, y0), (x1, y1) = np.reshape(tr([b[0], b[1], b[2], b[3]]), (2, 2))
        return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))

    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fill = (*np.clip(np.array(COLOURS[colour]) * rng.uniform(0.85, 1.15) + rng.normal(0, 12, 3), 0, 255)
            .astype(int).tolist(), 255)
    for kind, geom, *extra in SHAPES[shape]:
        if kind == "poly":
            draw.polygon(tr(geom), fill=fill)
        elif kind == "line":
            draw.line(tr(geom), fill=fill, width=max(1, round(extra[0] * k)), joint="curve")
        elif kind == "ell":
            draw.ellipse(box(geom), fill=fill)
        elif kind == "ring":
            draw.ellipse(box(geom), outline=fill, width=max(1, round(extra[0] * k)))
        else:  # cut: ImageDraw writes without blending, so a transparent fill makes a hole
            draw.ellipse(box(geom), fill=(0, 0, 0, 0))
    # a plain, light background: unlike the twin set's textures, so the two sets look different
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.75, 1.0)
    canvas = Image.new("RGB", (big, big), tuple(int(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)))
    canvas.paste(layer, (0, 0), layer)
    small = np.asarray(canvas.reduce(2), np.float32)
    ox, oy = rng.integers(0, image_size + 1, 2)
    small += rng.uniform(1.0, 4.0) * _noise_bank(image_size)[oy:oy + image_size, ox:ox + image_size]
    return Image.fromarray(np.clip(small.round(), 0, 255).astype(np.uint8)), size_word


def _items(split: str, seed: int, per_class: int) -> list[tuple[int, str, str, np.random.Generator]]:
    shapes, colours = list(SHAPES), list(COLOURS)
    out = []
    for s, shape in enumerate(shapes):
        for v in range(per_class):
            rng = np.random.default_rng([seed, _SPLIT_CODE[split], s, v])
            out.append((v, shape, colours[int(rng.integers(len(colours)))], rng))
    return out


def make_general_set(out_dir: Union[str, os.PathLike], seed: int = 0, train_per_class: int = 160,
                     eval_per_class: int = 25, image_size: int = 64, maxcount: int = 500) -> dict:
    """Write ``train/`` shards, the ``eval/`` class folders, ``classnames.txt``, ``templates.txt``, marker.

    Args:
        out_dir: target folder (its ``train/`` and ``eval/`` are replaced).
        seed: the same seed gives the same images and captions.
        train_per_class, eval_per_class: samples per shape in each split (separate random streams; a
            random colour each).
        image_size: image side in pixels.
        maxcount: samples per train shard.

    Returns:
        ``{"train": n, "eval": n}``, also stored in the marker file with the parameters.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)
    for sub in ("train", "eval"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "train").mkdir()
    train = _items("train", seed, train_per_class)
    order = np.random.default_rng([seed, _SPLIT_CODE["train"], 99]).permutation(len(train))
    sizes: dict[str, int] = {}
    with wds.ShardWriter(str(out / "train" / schema.SHARD_PATTERN), maxcount=maxcount, verbose=0,
                         mtime=SHARD_MTIME) as writer:
        for j in order.tolist():
            v, shape, colour, rng = train[j]
            image, size_word = render_shape(shape, colour, rng, image_size)
            caption = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))].format(
                colour=colour, shape=shape, size=size_word)
            data, ext = image_to_bytes(image)
            writer.write({schema.KEY: f"{shape}_{v:05d}", ext: data, schema.REPLAY_TEXT_MEMBER: caption.encode()})
            name = os.path.basename(writer.fname)
            sizes[name] = sizes.get(name, 0) + 1
    (out / "train" / schema.SIZES_FILE).write_text(json.dumps(sizes, indent=1, sort_keys=True))
    evals = _items("eval", seed, eval_per_class)
    for v, shape, colour, rng in evals:
        (out / "eval" / colour).mkdir(parents=True, exist_ok=True)
        render_shape(shape, colour, rng, image_size)[0].save(out / "eval" / colour / f"{shape}_{v:04d}.png")
    (out / CLASSNAMES_FILE).write_text("\n".join(COLOURS) + "\n")
    (out / TEMPLATES_FILE).write_text("".join(f"a {{c}} {shape}\n" for shape in SHAPES))
    counts = {"train": len(train), "eval": len(evals)}
    params = dict(version=GENERAL_VERSION, seed=seed, train_per_class=train_per_class, eval_per_class=eval_per_class,
                  image_size=image_size, maxcount=maxcount)
    (out / MARKER_FILE).write_text(json.dumps({"params": params, "samples": counts}, indent=1))
    return counts


def _is_complete(out: Path, params: Optional[dict]) -> bool:
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
        sizes = json.loads((out / "train" / schema.SIZES_FILE).read_text())
        return (params is None or marker["params"] == params) and all((out / "train" / n).is_file() for n in sizes) \
            and sum(sizes.values()) == marker["samples"]["train"]
    except (OSError, ValueError, KeyError):
        return False


def ensure_general_set(out_dir: Union[str, os.PathLike], seed: int = 0, force: bool = False,
                       train_per_class: int = 160, eval_per_class: int = 25, image_size: int = 64,
                       keep_any: bool = False) -> Path:
    """Build the set in ``out_dir`` unless a complete one with the same parameters is there.

    ``keep_any``: keep a complete set built with other parameters too (a reader that did not build
    it, such as the evaluation task, must not replace it with the defaults).

    Built in a temporary sibling folder and renamed into place (an interrupted build never looks
    complete); an existing folder is replaced only if it holds nothing but this set's files.

    Raises:
        FileExistsError: ``out_dir`` is incomplete and holds files the generator did not write.
    """
    out = Path(out_dir)
    params = dict(version=GENERAL_VERSION, seed=seed, train_per_class=train_per_class, eval_per_class=eval_per_class,
                  image_size=image_size, maxcount=500)
    if not force and _is_complete(out, None if keep_any else params):
        return out
    return build_in_place(out, lambda tmp: make_general_set(tmp, seed, train_per_class, eval_per_class, image_size),
                          lambda: _is_complete(out, params), _OWNED, force, "toy general set")


def main(argv: Optional[list[str]] = None) -> Path:
    """CLI: build the set (if needed) and print where its parts are."""
    parser = argparse.ArgumentParser(prog="python -m cultureclip.data.toy_general", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete set exists")
    args = parser.parse_args(argv)
    out = ensure_general_set(args.out, args.seed, args.force)
    print(json.dumps({"train": str(out / "train"), "eval": str(out / "eval"),
                      "classnames": str(out / CLASSNAMES_FILE), "templates": str(out / TEMPLATES_FILE)}, indent=1))
    return out


if __name__ == "__main__":
    main()
