"""The embedded default dataset: procedural, seeded, SYNTHETIC "cultural twin" shards.

This stands in for CulTwin (the paper's Stable-Diffusion twin-pair set) so that training runs with
no download: 24 twin pairs (48 concepts, 6 categories, 21 countries) of real culturally twinned
concept names, each drawn as a flat cartoon with PIL. The two concepts of a pair share one
silhouette and palette and differ only by a small drawn detail (a sash instead of a chest ribbon,
a crescent instead of a cross, eight spokes instead of twenty-four); different pairs have different
shapes and palettes. Every image is a fresh variant: random position, scale, rotation, flip,
palette jitter, background colour and texture, and pixel noise. Each sample is one twin pair (an
image of concept A as pos, a separate image of its twin B as neg); B-as-pos samples are written too,
so every concept is an anchor. The validation split is drawn from a separate random stream, so its
images are held out, and it covers every concept. Defaults: 40 train and 8 val pairs per anchor
concept at 64 px, i.e. 1,920 + 384 pairs in 8 + 2 shards, about 17 MB, built in seconds on a CPU.

What it can show: that the training loop works end to end (shards, loader, loss, LoRA, checkpoints,
evaluation), and whether twin hard negatives help a model separate concepts that differ by one
subtle visual detail, measured on the held-out split.

What it cannot show: anything about real cultural knowledge, real images, or accuracy on CulTwin or
any real benchmark. The names and captions are labels on cartoons; the "distinguishing details" are
simplified, partly invented stand-ins, and a model trained here learns shapes, not cultures.

Layout written by :func:`make_toy_shards`::

    out_dir/train/shard-000000.tar ... + sizes.json
    out_dir/val/shard-000000.tar ...   + sizes.json
    out_dir/concepts.json              the concept table (name, category, country, twin, detail)
    out_dir/toy_complete.json          written last: parameters and counts (the completeness marker)

CLI: ``python -m cultureclip.data.toy --out DIR [--seed N] [--force]``.
"""
from __future__ import annotations

import argparse
import colorsys
import functools
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, ImageDraw

from cultureclip import schema
from cultureclip.data.shards import TwinShardWriter, read_sizes

TOY_VERSION = 2  # bump whenever the drawings change, so cached sets are rebuilt
CONCEPTS_FILE = "concepts.json"
MARKER_FILE = "toy_complete.json"
SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 1, "val": 2}  # part of every RNG seed: the two splits never share a stream
_NOISE = (1.0, 4.0)  # range of the pixel-noise sigma
_OWNED = {*SPLITS, CONCEPTS_FILE, MARKER_FILE}  # the only names a rebuild may replace


# ---- drawing helpers; geometry lives in a 100 x 100 frame ----
def _c(cx, cy, r):
    return (cx - r, cy - r, cx + r, cy + r)


def _around(cx, cy, r, n, start=-90.0, stop=270.0):
    step = (stop - start) / n
    return [(cx + r * math.cos(math.radians(start + i * step)), cy + r * math.sin(math.radians(start + i * step)))
            for i in range(n)]


def _dots(points, r, col):
    return [("ell", col, _c(x, y, r)) for x, y in points]


def _spokes(cx, cy, r0, r1, n, col, w):
    angles = [2 * math.pi * i / n for i in range(n)]
    return [("line", col, (cx + r0 * math.cos(a), cy + r0 * math.sin(a), cx + r1 * math.cos(a), cy + r1 * math.sin(a)),
             w) for a in angles]


def _petals(cx, cy, r, n, col):
    """n pointed petals (triangles) around a centre."""
    ops, half = [], math.pi / n
    for i in range(n):
        a = 2 * math.pi * i / n
        ops.append(("poly", col, (cx + r * 0.3 * math.cos(a - half), cy + r * 0.3 * math.sin(a - half),
                                  cx + r * math.cos(a), cy + r * math.sin(a),
                                  cx + r * 0.3 * math.cos(a + half), cy + r * 0.3 * math.sin(a + half))))
    return ops


def _bands(box, ys, col, w):
    """Horizontal lines across an ellipse (chords), e.g. the ribs of a lantern."""
    cx, cy, rx, ry = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    return [("line", col, (cx - hw, y, cx + hw, y), w)
            for y in ys for hw in [rx * math.sqrt(max(0.0, 1 - ((y - cy) / ry) ** 2)) - 1]]


def _arc(cx, cy, r, a0, a1, n, wobble=0.0):
    pts = []
    for i in range(n + 1):
        a, rr = math.radians(a0 + (a1 - a0) * i / n), r + (wobble if i % 2 else -wobble)
        pts += [cx + rr * math.cos(a), cy + rr * math.sin(a)]
    return tuple(pts)


# ---- the concept table: one entry per twin pair ----
# palette: 0 main, 1 accent, 2 dark, 3 light; a literal RGB tuple or "clear" (cut-out) also works.
# concept: (name, country, noun phrase, key visual feature = the twin detail, cultural context);
# nouns <= 3 words, features <= 5, contexts <= 4, so every caption stays under 15 words.
_GREEN, _WHITE = (60, 150, 60), (250, 250, 245)
PAIRS = [
    dict(category="Clothing", palette=((222, 110, 150), (110, 50, 150), (60, 30, 70), (250, 235, 210)),
         body=[("poly", 0, (30, 20, 70, 20, 92, 42, 82, 50, 68, 38, 70, 90, 30, 90, 32, 38, 18, 50, 8, 42)),
               ("line", 3, (40, 20, 50, 40, 60, 20), 4)],
         a=("hanbok", "South Korea", "a hanbok", "a long bow-tied chest ribbon", "at a Seoul palace"),
         a_ops=[("ell", 1, _c(45, 42, 5)), ("ell", 1, _c(55, 42, 5)), ("line", 1, (50, 44, 45, 68), 3),
                ("line", 1, (51, 44, 56, 66), 3)],
         b=("kimono", "Japan", "a kimono", "a wide obi sash", "at a Kyoto tea ceremony"),
         b_ops=[("rect", 1, (31, 52, 69, 63)), ("line", 3, (31, 57, 69, 57), 2)]),
    dict(category="Clothing", palette=((200, 30, 45), (235, 190, 70), (90, 10, 20), (245, 240, 225)),
         body=[("rect", 0, (44, 10, 56, 19)),
               ("poly", 0, (40, 18, 60, 18, 70, 32, 62, 36, 61, 46, 66, 86, 34, 86, 39, 46, 38, 36, 30, 32))],
         a=("qipao", "China", "a qipao", "a diagonal frog-button closure", "at a Shanghai tea house"),
         a_ops=[("line", 1, (50, 19, 58, 27, 62, 35), 3), *_dots([(55, 24), (60, 31)], 2.5, 1)],
         b=("ao dai", "Vietnam", "an ao dai", "long panels over white trousers", "on a Hanoi street"),
         b_ops=[("rect", 3, (37, 84, 48, 99)), ("rect", 3, (52, 84, 63, 99)), ("line", 2, (40, 58, 35, 86), 2),
                ("line", 2, (60, 58, 65, 86), 2)]),
    dict(category="Clothing", palette=((40, 110, 70), (205, 50, 50), (30, 40, 80), (240, 235, 220)),
         body=[("rect", 2, (33, 20, 67, 28)), ("poly", 0, (34, 28, 66, 28, 80, 82, 20, 82)),
               ("rect", 3, (36, 82, 44, 96)), ("rect", 3, (56, 82, 64, 96))],
         a=("kilt", "Scotland", "a kilt", "a crossing red tartan check", "at a Highland games"),
         a_ops=[("line", 1, (32, 42, 68, 42), 3), ("line", 1, (28, 58, 72, 58), 3), ("line", 1, (25, 72, 75, 72), 3),
                ("line", 1, (42, 29, 40, 81), 3), ("line", 1, (58, 29, 60, 81), 3)],
         b=("fustanella", "Greece", "a fustanella", "dense fine vertical pleats", "at an Athens parade"),
         b_ops=[("line", 2, (36 + 2.8 * i, 29, 22 + 5.6 * i, 81), 1.5) for i in range(11)]),
    dict(category="Clothing", palette=((50, 80, 170), (230, 60, 60), (40, 40, 50), (250, 250, 240)),
         body=[("ell", 3, _c(34, 24, 8)), ("ell", 3, _c(66, 24, 8)), ("rect", 2, (38, 18, 62, 46)),
               ("poly", 0, (36, 46, 64, 46, 78, 90, 22, 90))],
         a=("dirndl", "Germany", "a dirndl", "a white apron at the waist", "at Munich Oktoberfest"),
         a_ops=[("rect", 3, (41, 48, 59, 86)), ("line", 1, (37, 48, 63, 48), 3)],
         b=("sarafan", "Russia", "a sarafan", "a central row of buttons", "at a village khorovod dance"),
         b_ops=[("line", 1, (50, 18, 50, 90), 4), *_dots([(50, y) for y in range(24, 90, 10)], 2.5, 3)]),
    dict(category="Cuisine", palette=((228, 196, 130), (160, 100, 50), (110, 70, 40), (245, 245, 240)),
         body=[("ell", 3, (8, 48, 92, 84)), ("pie", 0, (18, 28, 82, 92), 180, 360)],
         a=("pierogi", "Poland", "pierogi", "fork-pressed dots along the edge", "at a Krakow Christmas supper"),
         a_ops=_dots(_around(50, 60, 28, 10, 185, 355), 2, 2),
         b=("empanada", "Argentina", "an empanada", "a braided rope edge", "at a Buenos Aires bakery"),
         b_ops=[("line", 1, _arc(50, 60, 29, 182, 358, 22, 3), 3)]),
    dict(category="Cuisine", palette=((240, 240, 235), (200, 120, 50), (40, 60, 120), (245, 220, 150)),
         body=[("pie", 0, (12, 16, 88, 92), 0, 180), ("ell", 1, (12, 44, 88, 64)), ("line", 2, (22, 76, 78, 76), 3),
               ("line", 3, (20, 54, 40, 50, 60, 56, 80, 52), 2)],
         a=("pho", "Vietnam", "a pho bowl", "basil leaves and lime wedge", "at a Saigon stall"),
         a_ops=[("ell", _GREEN, (24, 45, 38, 51)), ("ell", _GREEN, (32, 50, 46, 56)),
                ("pie", (180, 215, 80), _c(66, 53, 8), 180, 360)],
         b=("ramen", "Japan", "a ramen bowl", "a halved egg and nori", "in a Tokyo alley"),
         b_ops=[("ell", _WHITE, (54, 46, 70, 57)), ("ell", (240, 170, 40), (58, 48, 66, 55)),
                ("poly", (25, 35, 25), (26, 30, 38, 28, 40, 54, 28, 54))]),
    dict(category="Cuisine", palette=((30, 40, 30), (250, 248, 240), (20, 20, 20), (205, 165, 110)),
         body=[("rect", 3, (8, 58, 92, 74)),
               *[op for x, y in ((28, 50), (50, 44), (72, 50))
                 for op in (("ell", 0, _c(x, y, 14)), ("ell", 1, _c(x, y, 11)))]],
         a=("sushi roll", "Japan", "a sushi roll", "a single red tuna core", "at a Tokyo counter"),
         a_ops=[("rect", (205, 50, 60), _c(x, y, 5)) for x, y in ((28, 50), (50, 44), (72, 50))],
         b=("kimbap", "South Korea", "kimbap slices", "a ring of colourful fillings", "at a Seoul picnic"),
         b_ops=[("ell", col, _c(x + dx, y + dy, 2.6)) for x, y in ((28, 50), (50, 44), (72, 50))
                for col, (dx, dy) in zip(((240, 200, 40), _GREEN, (230, 120, 40), (120, 70, 40)),
                                         ((-4, 0), (4, 0), (0, -4), (0, 4)))]),
    dict(category="Cuisine", palette=((225, 180, 110), (195, 60, 40), (100, 45, 25), (250, 245, 220)),
         body=[("ell", 0, _c(50, 50, 38)), ("ell", 1, _c(50, 50, 32))],
         a=("pizza margherita", "Italy", "a pizza margherita", "mozzarella blobs and basil", "in a Naples pizzeria"),
         a_ops=[*_dots([(40, 38), (62, 40), (50, 52), (36, 62), (62, 64)], 6, 3),
                ("ell", _GREEN, (44, 62, 54, 68)), ("ell", _GREEN, (54, 30, 64, 36))],
         b=("lahmacun", "Turkey", "a lahmacun", "spiced minced-meat speckles", "at an Istanbul kebab house"),
         b_ops=_dots([(50 + (5 + 3.3 * (i % 7)) * math.cos(2.4 * i), 50 + (5 + 3.3 * (i % 7)) * math.sin(2.4 * i))
                      for i in range(26)], 1.8, 2)),
    dict(category="Art", palette=((120, 60, 30), (230, 200, 150), (40, 25, 15), (200, 200, 200)),
         body=[("line", 2, (50, 6, 50, 80), 4), ("line", 2, (43, 12, 57, 12), 3), ("line", 2, (43, 20, 57, 20), 3),
               ("line", 3, (48, 14, 48, 80), 1), ("line", 3, (52, 14, 52, 80), 1),
               ("line", 0, (16, 58, 88, 72), 2), ("line", 1, (16, 61, 88, 75), 2)],
         a=("erhu", "China", "an erhu", "a hexagonal snakeskin sound box", "at a Beijing opera"),
         a_ops=[("poly", 0, tuple(v for p in _around(50, 84, 14, 6, 0, 360) for v in p)),
                ("poly", 2, tuple(v for p in _around(50, 84, 9, 6, 0, 360) for v in p))],
         b=("haegeum", "South Korea", "a haegeum", "a round bamboo sound box", "in a Korean court ensemble"),
         b_ops=[("ell", 0, _c(50, 84, 14)), ("ell", 2, _c(50, 84, 9))]),
    dict(category="Art", palette=((150, 90, 45), (205, 55, 55), (70, 40, 20), (240, 230, 200)),
         body=[("poly", 0, (8, 46, 92, 34, 94, 48, 10, 60)),
               *[("line", 3, (12, 48 + 2.5 * i, 91, 37 + 2.5 * i), 1) for i in range(5)],
               *[("poly", 2, (x, y, x + 3, y - 5, x + 6, y))  # the bridges, in a slanted row
                 for x in range(26, 80, 9) for y in [52 - 0.13 * x - (x % 3)]]],
         a=("guzheng", "China", "a guzheng", "a carved flower headstock panel", "at a Suzhou recital"),
         a_ops=[("ell", 1, (74, 34, 94, 47)), ("ell", 3, _c(84, 40.5, 3))],
         b=("gayageum", "South Korea", "a gayageum", "loose silk cords at the tail", "at a Busan concert"),
         b_ops=[("line", 1, (10 + 3 * i, 57, 8 + 4 * i, 78 - i), 2) for i in range(5)]),
    dict(category="Art", palette=((140, 90, 50), (235, 215, 170), (60, 40, 25), (185, 185, 200)),
         body=[("ell", 0, _c(50, 50, 40)), ("ell", 1, _c(50, 50, 33))],
         a=("bodhran", "Ireland", "a bodhran", "a wooden cross-brace inside", "in a Dublin pub session"),
         a_ops=[("line", 2, (50, 17, 50, 83), 4), ("line", 2, (17, 50, 83, 50), 4)],
         b=("daf", "Iran", "a daf", "small metal rings inside the rim", "at a Kurdish wedding"),
         b_ops=[("ring", 3, _c(x, y, 4), 2) for x, y in _around(50, 50, 28, 12)]),
    dict(category="Art", palette=((230, 185, 120), (190, 40, 40), (40, 30, 30), (250, 225, 200)),
         body=[("ell", 0, (28, 34, 72, 94)), ("ell", 1, _c(50, 28, 15)), ("ell", 3, _c(50, 28, 10)),
               *_dots([(46, 26), (54, 26)], 1.5, 2)],
         a=("matryoshka", "Russia", "a matryoshka", "a flower-painted apron", "at a Moscow craft market"),
         a_ops=[("ell", 3, (38, 54, 62, 86)), ("ell", 1, _c(50, 68, 6)), ("ell", (240, 200, 60), _c(50, 68, 2.5))],
         b=("kokeshi", "Japan", "a kokeshi doll", "painted bands around the body", "at a Sendai shop"),
         b_ops=_bands((28, 34, 72, 94), (50, 62, 74, 86), 1, 3)),
    dict(category="Architecture", palette=((170, 120, 90), (200, 60, 40), (70, 50, 40), (230, 220, 200)),
         body=[("rect", 0, (20, 74, 80, 90)), ("rect", 0, (27, 58, 73, 74)), ("rect", 0, (34, 42, 66, 58)),
               ("rect", 0, (41, 26, 59, 42)), *[("line", 2, (x0, y, 100 - x0, y), 1) for x0, y in
                                               ((20, 74), (27, 58), (34, 42))]],
         a=("pagoda", "China", "a pagoda", "upturned eaves on every tier", "at a Xi'an temple"),
         a_ops=[("poly", 1, (x0 - 6, y + 2, 106 - x0, y + 2, 110 - x0, y - 4, 100 - x0, y - 1, x0, y - 1,
                             x0 - 10, y - 4))
                for x0, y in ((20, 74), (27, 58), (34, 42), (41, 26))] + [("line", 2, (50, 24, 50, 10), 2)],
         b=("stepped pyramid", "Mexico", "a stepped pyramid", "a central stairway and temple",
            "at Chichen Itza"),
         b_ops=[("rect", 2, (45, 26, 55, 90)), *[("line", 3, (45, y, 55, y), 1) for y in range(30, 90, 5)],
                ("rect", 3, (41, 15, 59, 26)), ("rect", 2, (47, 18, 53, 26))]),
    dict(category="Architecture", palette=((210, 60, 40), (40, 120, 90), (30, 30, 30), (240, 230, 210)),
         body=[("rect", 0, (28, 30, 35, 92)), ("rect", 0, (65, 30, 72, 92)), ("rect", 0, (20, 42, 80, 48)),
               ("rect", 0, (16, 26, 84, 33)), ("rect", 3, (46, 33, 54, 42))],
         a=("torii", "Japan", "a torii gate", "black upswept lintel ends", "at a Kyoto Shinto shrine"),
         a_ops=[("poly", 2, (8, 16, 50, 22, 92, 16, 88, 26, 50, 27, 12, 26))],
         b=("paifang", "China", "a paifang gate", "a green tiled roof above", "at a Beijing hutong"),
         b_ops=[("poly", 1, (12, 27, 88, 27, 76, 14, 24, 14)), ("poly", 1, (36, 15, 64, 15, 58, 5, 42, 5))]),
    dict(category="Architecture", palette=((70, 120, 180), (230, 190, 60), (60, 60, 70), (235, 230, 220)),
         body=[("rect", 3, (24, 56, 76, 92)), ("rect", 3, (38, 46, 62, 56)), ("ell", 0, (32, 22, 68, 54)),
               ("pie", 2, (44, 74, 56, 100), 180, 360), ("rect", 2, (30, 64, 36, 74)), ("rect", 2, (64, 64, 70, 74))],
         a=("onion-dome church", "Russia", "an onion-dome church", "a gilded Orthodox cross on top", "in Moscow"),
         a_ops=[("line", 1, (50, 24, 50, 3), 3), ("line", 1, (42, 9, 58, 9), 3), ("line", 1, (44, 17, 56, 14), 2)],
         b=("Ottoman mosque", "Turkey", "an Ottoman mosque", "a golden crescent finial on top", "in Istanbul"),
         b_ops=[("line", 1, (50, 24, 50, 14), 3), ("ell", 1, _c(50, 8, 8)), ("ell", "clear", _c(54, 6, 7))]),
    dict(category="Architecture", palette=((230, 225, 210), (150, 40, 40), (60, 50, 45), (200, 180, 140)),
         body=[("poly", 0, (38, 44, 62, 44, 68, 94, 32, 94)), ("ell", 1, (36, 34, 64, 50)),
               ("rect", 2, (46, 80, 54, 94))],
         a=("Dutch windmill", "Netherlands", "a Dutch windmill", "four broad lattice sails",
            "along a Kinderdijk canal"),
         a_ops=[*_spokes(50, 40, 4, 40, 4, 2, 8), *_spokes(50, 40, 4, 39, 4, 3, 4), ("ell", 2, _c(50, 40, 4))],
         b=("Cycladic windmill", "Greece", "a Cycladic windmill", "eight triangular cloth sails",
            "on a Mykonos hilltop"),
         b_ops=[*[("poly", 3, (50, 40, *p, *q)) for p, q in zip(_around(50, 40, 38, 8, 0, 360),
                                                                 _around(50, 40, 30, 8, 25, 385))],
                *_spokes(50, 40, 0, 38, 8, 2, 2), ("ell", 2, _c(50, 40, 4))]),
    dict(category="Symbol", palette=((200, 45, 55), (35, 65, 150), (20, 20, 20), (245, 245, 240)),
         body=[("ell", 3, _c(50, 50, 41)), ("pie", 0, _c(50, 50, 36), 180, 360), ("pie", 1, _c(50, 50, 36), 0, 180),
               ("ell", 0, _c(32, 50, 18)), ("ell", 1, _c(68, 50, 18))],
         a=("taegeuk", "South Korea", "a taegeuk", "two undotted swirling halves", "on a Korean holiday banner"),
         a_ops=[],
         b=("taijitu", "China", "a taijitu", "two small contrasting eye dots", "at a Wudang Taoist temple"),
         b_ops=[("ell", 1, _c(32, 50, 6)), ("ell", 0, _c(68, 50, 6))]),
    dict(category="Symbol", palette=((140, 140, 135), (100, 100, 95), (60, 60, 58), (190, 190, 180)),
         body=[("rect", 0, (43, 8, 57, 94)), ("rect", 0, (22, 28, 78, 42)), ("rect", 2, (34, 86, 66, 97))],
         a=("Celtic cross", "Ireland", "a Celtic cross", "a ring around the crossing", "in a Connemara churchyard"),
         a_ops=[("ring", 2, _c(50, 35, 18), 5)],
         b=("khachkar", "Armenia", "a khachkar cross", "trefoil knobs on each arm", "at a Yerevan monastery"),
         b_ops=_dots([(45, 8), (55, 8), (50, 3), (22, 30), (22, 40), (17, 35), (78, 30), (78, 40), (83, 35)],
                     4.5, 2)),
    dict(category="Symbol", palette=((235, 180, 60), (200, 80, 60), (110, 60, 30), (250, 240, 200)),
         body=[("ell", 2, _c(50, 50, 44))],
         a=("lotus emblem", "India", "a lotus emblem", "eight pointed petals", "at a Varanasi temple"),
         a_ops=[*_petals(50, 50, 40, 8, 0), ("ell", 1, _c(50, 50, 10))],
         b=("chrysanthemum crest", "Japan", "a chrysanthemum crest", "sixteen rounded petals", "on an imperial gate"),
         b_ops=[*_spokes(50, 50, 10, 36, 16, 0, 5), *_dots(_around(50, 50, 37, 16), 3, 0),
                ("ell", 1, _c(50, 50, 10))]),
    dict(category="Symbol", palette=((30, 50, 140), (235, 190, 60), (20, 20, 40), (245, 245, 240)),
         body=[("ell", 3, _c(50, 50, 44)), ("ring", 0, _c(50, 50, 34), 5), ("ell", 0, _c(50, 50, 7))],
         a=("Ashoka Chakra", "India", "an Ashoka Chakra", "twenty-four thin spokes", "on a Republic Day banner"),
         a_ops=_spokes(50, 50, 6, 33, 24, 0, 1.5),
         b=("dharmachakra", "Bhutan", "a dharmachakra", "eight spokes with knobbed handles", "at a Thimphu dzong"),
         b_ops=[*_spokes(50, 50, 6, 42, 8, 0, 3.5), *_dots(_around(50, 50, 42, 8, 0, 360), 4, 0)]),
    dict(category="Festival", palette=((215, 40, 40), (240, 200, 60), (40, 30, 30), (250, 240, 220)),
         body=[("ell", 0, (22, 18, 78, 82)), ("rect", 2, (38, 12, 62, 20)), ("rect", 2, (38, 80, 62, 88)),
               ("line", 2, (50, 1, 50, 12), 2)],
         a=("Chinese lantern", "China", "a Chinese lantern", "a golden tassel below",
            "at a Spring Festival fair"),
         a_ops=[("ell", 1, _c(50, 90, 3.5)), *[("line", 1, (50, 90, x, 100), 2) for x in (45, 50, 55)]],
         b=("chochin", "Japan", "a chochin lantern", "thin horizontal bamboo ribs", "outside an Osaka izakaya"),
         b_ops=_bands((22, 18, 78, 82), range(26, 80, 7), 2, 1.5)),
    dict(category="Festival", palette=((60, 140, 70), (250, 160, 40), (30, 60, 110), (250, 235, 190)),
         body=[("rect", 2, (2, 68, 98, 82)), ("line", 3, (6, 76, 20, 73, 34, 76, 48, 73, 62, 76, 76, 73, 94, 76), 1),
               ("poly", 0, (22, 60, 78, 60, 70, 72, 30, 72)), ("rect", 3, (48, 34, 52, 50)),
               ("ell", 1, (45, 22, 55, 36))],
         a=("krathong", "Thailand", "a krathong", "a folded banana-leaf petal rim", "at Chiang Mai Loy Krathong"),
         a_ops=[*[("poly", (40, 110, 50) if i % 2 else 0, (24 + 7 * i, 61, 31 + 7 * i, 61, 27.5 + 7 * i, 49))
                  for i in range(8)], *_dots([(36, 56), (64, 56)], 3, (230, 100, 150))],
         b=("toro nagashi", "Japan", "a toro nagashi", "a square paper box", "on a Hiroshima river"),
         b_ops=[("rect", 3, (35, 32, 65, 61)), ("line", 2, (35, 32, 65, 32, 65, 61, 35, 61, 35, 32), 2),
                ("ell", 1, _c(50, 48, 4))]),
    dict(category="Festival", palette=((150, 80, 40), (240, 190, 50), (40, 30, 20), (230, 220, 200)),
         body=[("poly", 0, (10, 56, 90, 56, 82, 68, 18, 68)), ("line", 1, (14, 62, 86, 62), 2),
               *[("line", 2, (x, 53, x - 6, 74), 1) for x in range(26, 80, 10)],
               *_dots([(x, 51) for x in range(24, 80, 10)], 3, 2)],
         a=("dragon boat", "China", "a dragon boat", "a carved dragon-head bow", "at a Duanwu race"),
         a_ops=[("poly", 1, (84, 58, 90, 40, 99, 36, 100, 44, 94, 46, 92, 58)), ("ell", 2, _c(94, 41, 1.5))],
         b=("snake boat", "India", "a snake boat", "a tall curving stern", "at a Kerala Onam race"),
         b_ops=[("poly", 0, (12, 58, 1, 22, 6, 20, 19, 58)), ("line", 1, (5, 25, 14, 56), 1)]),
    dict(category="Festival", palette=((245, 245, 245), (40, 90, 180), (50, 40, 30), (60, 140, 60)),
         body=[("line", 0, (50, 4, 50, 94), 5), ("ell", 3, (40, 1, 60, 12)), ("rect", 2, (42, 90, 58, 98))],
         a=("Bavarian maypole", "Germany", "a Bavarian maypole", "blue stripes and guild signboards",
            "in a Bavarian village"),
         a_ops=[*[("line", 1, (47, y, 53, y + 4), 3) for y in range(14, 88, 8)],
                *[("rect", 1, (30, y, 44, y + 7)) for y in (24, 46, 68)],
                *[("rect", 1, (56, y, 70, y + 7)) for y in (35, 57)]],
         b=("midsommarstang", "Sweden", "a midsommarstang", "a cross-bar with two wreaths", "at a Swedish Midsummer"),
         b_ops=[("line", 0, (24, 22, 76, 22), 4), ("ring", 3, _c(28, 35, 9), 3), ("ring", 3, _c(72, 35, 9), 3)]),
]

CAPTION_TEMPLATES = (  # <= 2 fixed words each: with the limits above, every caption has < 15 words
    "{noun} with {feature} {context}",
    "{noun} from {country} with {feature}",
    "{noun} showing {feature}, {context}",
    "{context}, {noun} with {feature}",
    "{noun} of {country}, with {feature}",
    "close-up: {noun} with {feature}, {context}",
)


def concept_table() -> list[dict]:
    """Return the 48 concepts, twins adjacent: index ``2 * pair_id + side`` (side 0 or 1)."""
    table = []
    for pid, pair in enumerate(PAIRS):
        for side, (me, twin) in enumerate(((pair["a"], pair["b"]), (pair["b"], pair["a"]))):
            name, country, noun, feature, context = me
            table.append(dict(name=name, category=pair["category"], country=country, twin=twin[0],
                              detail=feature, twin_detail=twin[3], pair_id=pid, side=side, noun=noun, context=context,
                              captions=[t.format(noun=noun, feature=feature, context=context, country=country)
                                        for t in CAPTION_TEMPLATES]))
    return table


# ---- rendering ----
def _compile(ops, palette):
    """Flatten a drawing into arrays so that one image needs one vectorised jitter and colour step.

    Returns ``(plan, coords, jitter index, number of jitter values, base colours)``; a plan entry is
    ``(kind, is_cut_out, first coord, end coord, extra args)``.
    """
    plan, coords, idx, n, rgb = [], [], [], 0, []
    for kind, spec, geom, *extra in ops:
        plan.append((kind, spec == "clear", len(coords), len(coords) + len(geom), extra))
        rgb.append((0, 0, 0) if spec == "clear" else palette[spec] if isinstance(spec, int) else spec)
        if kind in ("poly", "line"):  # every vertex moves a little: no two drawings are identical
            idx += range(n, n + len(geom))
            n += len(geom)
        else:  # boxes move as a whole (same dx, dy for both corners), so they never invert
            idx += [n, n + 1, n, n + 1]
            n += 2
        coords += geom
    return plan, np.asarray(coords, float), np.asarray(idx, int), n, np.asarray(rgb, float)


_DRAWINGS = [_compile(p["body"] + p[side], p["palette"]) for p in PAIRS for side in ("a_ops", "b_ops")]  # by concept


def _draw(draw, index, k, rng):
    plan, coords, idx, n, rgb = _DRAWINGS[index]
    xy = ((coords + rng.normal(0, 0.7, n)[idx]) * k).tolist()
    fills = np.clip(rgb * rng.uniform(0.85, 1.15) + rng.normal(0, 10, 3), 0, 255).astype(int).tolist()  # light, tint
    for (kind, clear, i, j, extra), fill in zip(plan, fills):
        # ImageDraw writes pixels without blending, so a transparent fill cuts a hole (the crescent)
        fill = (0, 0, 0, 0) if clear else (*fill, 255)
        geom = xy[i:j]
        if kind == "poly":
            draw.polygon(geom, fill=fill)
        elif kind == "line":
            draw.line(geom, fill=fill, width=max(1, round(extra[0] * k)), joint="curve")
        elif kind == "ell":
            draw.ellipse(geom, fill=fill)
        elif kind == "rect":
            draw.rectangle(geom, fill=fill)
        elif kind == "pie":
            draw.pieslice(geom, extra[0], extra[1], fill=fill)
        else:  # ring
            draw.ellipse(geom, outline=fill, width=max(1, round(extra[0] * k)))


_GRID = np.mgrid[0:32, 0:32].astype(np.float32)[..., None] / 32  # (y, x) coordinates of the coarse background


def _background(rng, size):
    """A random gradient, optionally with stripes, checks or blotches: the background is never a cue."""
    # computed on a coarse 32 x 32 grid and upsampled: cheap, and smooth backgrounds keep the JPEGs small
    yy, xx = _GRID
    c0 = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.3, 0.95))) * 255
    c1 = np.clip(c0 + rng.normal(0, 40, 3), 0, 255)
    ca, sa = np.cos(a := rng.uniform(0, 2 * math.pi)), np.sin(a)
    g = 0.5 + 0.7 * (ca * (xx - 0.5) + sa * (yy - 0.5))  # a linear ramp, within [0, 1]
    img = c0 + (c1 - c0) * g
    kind = rng.integers(4)
    if kind == 1:
        img += rng.uniform(6, 18) * np.sign(np.sin((xx * ca - yy * sa) * rng.uniform(8, 30)))
    elif kind == 2:
        f = rng.uniform(6, 16)
        img += rng.uniform(5, 15) * np.sign(np.sin(xx * f) * np.sin(yy * f))
    elif kind == 3:
        f = rng.uniform(3, 9, 2)
        img += rng.uniform(8, 20) * np.sin(xx * f[0] + rng.uniform(0, 6)) * np.sin(yy * f[1] + rng.uniform(0, 6))
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    img = img.resize((size // 2, size // 2), Image.Resampling.BILINEAR)
    return img.resize((size, size), Image.Resampling.NEAREST)  # the final 2x box reduction undoes this exactly


@functools.lru_cache(maxsize=4)
def _noise_bank(image_size):
    return np.random.default_rng(20250101).standard_normal((2 * image_size, 2 * image_size, 3), dtype=np.float32)


def render_concept(index: int, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw one random variant of concept ``index`` (see :func:`concept_table`) as an RGB image.

    Args:
        index: concept index, ``2 * pair_id + side``.
        rng: the random stream that decides this variant (pose, colours, background, noise).
        image_size: output side in pixels; drawing happens at twice the size for anti-aliasing.

    Returns:
        An ``image_size`` x ``image_size`` RGB ``PIL.Image``.
    """
    big = 2 * image_size
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _draw(ImageDraw.Draw(layer), index, big / 100, rng)
    if rng.random() < 0.5:  # a mirrored photo shows the same concept; no twin detail depends on the side
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # one affine warp (rotate by theta, scale by s, move the centre to (ox, oy)) instead of rotate + resize
    theta, s = math.radians(rng.uniform(-15, 15)), rng.uniform(0.6, 0.95)
    ox, oy = rng.uniform(s * big / 2, big - s * big / 2, 2)
    a, b, d = math.cos(theta) / s, math.sin(theta) / s, -math.sin(theta) / s
    warp = (a, b, big / 2 - a * ox - b * oy, d, a, big / 2 - d * ox - a * oy)  # output -> input pixel map
    # nearest is 10x faster than bilinear here, and the 2x box reduction below smooths the edges anyway
    layer = layer.transform((big, big), Image.Transform.AFFINE, warp, Image.Resampling.NEAREST)
    canvas = _background(rng, big)
    canvas.paste(layer, (0, 0), layer)
    small = np.asarray(canvas.reduce(2), np.float32)
    ox, oy = rng.integers(0, image_size + 1, 2)  # a random window of a fixed noise bank: 10x cheaper than drawing
    small += rng.uniform(*_NOISE) * _noise_bank(image_size)[oy:oy + image_size, ox:ox + image_size]
    return Image.fromarray(np.clip(small.round(), 0, 255).astype(np.uint8))


def _rng(seed, split, purpose, *ids):
    # one independent stream per (seed, split, purpose, item): order-free and reproducible, no hash().
    # The purpose tag keeps streams apart: SeedSequence ignores trailing zeros ([s, 1] == [s, 1, 0, 0]).
    return np.random.default_rng([seed, _SPLIT_CODE[split], purpose, *ids])


def _write_split(split_dir, split, seed, variants, image_size, maxcount, table):
    items = [(c, v) for c in range(len(table)) for v in range(variants)]
    order = _rng(seed, split, 0).permutation(len(items))  # mix concepts so every shard holds all pairs
    maxcount = maxcount or max(1, math.ceil(len(items) / (8 if split == "train" else 2)))
    with TwinShardWriter(split_dir, maxcount=maxcount) as writer:
        for j in order.tolist():
            c, v = items[j]
            pos, neg = table[c], table[c ^ 1]  # the twin is the other side of the same pair
            rng = _rng(seed, split, 1, c, v)  # captions, then the pos image, then the neg image
            meta = {schema.POS_CAPTION: pos["captions"][rng.integers(len(pos["captions"]))],
                    schema.NEG_CAPTION: neg["captions"][rng.integers(len(neg["captions"]))],
                    schema.POS_CONCEPT: pos["name"], schema.NEG_CONCEPT: neg["name"],
                    schema.POS_COUNTRY: pos["country"], schema.NEG_COUNTRY: neg["country"],
                    schema.CATEGORY: pos["category"], schema.PAIR_ID: pos["pair_id"]}
            writer.write(f"{split}_c{c:02d}_v{v:04d}", render_concept(c, rng, image_size),
                         render_concept(c ^ 1, rng, image_size), meta)
    return writer.sizes


def make_toy_shards(out_dir: Union[str, os.PathLike], seed: int = 0, train_variants: int = 40,
                    val_variants: int = 8, image_size: int = 64, maxcount: Optional[int] = None) -> dict:
    """Write the synthetic twin-pair shards, ``concepts.json`` and the completeness marker.

    Every concept is the anchor (pos) of ``train_variants`` train samples and ``val_variants`` val
    samples; its twin is the neg, drawn as a separate random variant.

    Args:
        out_dir: target folder; ``train/`` and ``val/`` are created inside (existing shards are overwritten).
        seed: the same seed gives identical tar members (keys, image bytes, json).
        train_variants: train samples per anchor concept.
        val_variants: val samples per anchor concept, drawn from a separate random stream.
        image_size: image side in pixels.
        maxcount: pairs per shard; ``None`` gives 8 train shards and 2 val shards.

    Returns:
        The summary of :func:`toy_summary`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER_FILE).unlink(missing_ok=True)  # the set is incomplete until the marker is rewritten
    table = concept_table()
    doc = {"synthetic": True, "generator": "cultureclip.data.toy", "concepts": table}
    (out / CONCEPTS_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    counts = {}
    for split, variants in zip(SPLITS, (train_variants, val_variants)):
        if (out / split).exists():
            shutil.rmtree(out / split)
        counts[split] = sum(_write_split(out / split, split, seed, variants, image_size, maxcount, table).values())
    params = dict(version=TOY_VERSION, seed=seed, train_variants=train_variants, val_variants=val_variants,
                  image_size=image_size, maxcount=maxcount)
    (out / MARKER_FILE).write_text(json.dumps({"params": params, "samples": counts}, indent=1))
    return toy_summary(out)


def toy_summary(out_dir: Union[str, os.PathLike]) -> dict:
    """Describe a built toy set: paths, shard url patterns, sample, concept and country counts."""
    out = Path(out_dir).resolve()
    marker = json.loads((out / MARKER_FILE).read_text())
    table = json.loads((out / CONCEPTS_FILE).read_text())["concepts"]
    summary = dict(out_dir=str(out), concepts_file=str(out / CONCEPTS_FILE), **marker["params"],
                   concepts=len(table), pairs=len({c["pair_id"] for c in table}),
                   categories=len({c["category"] for c in table}), countries=len({c["country"] for c in table}))
    for split in SPLITS:
        sizes = read_sizes(out / split)
        last = len(sizes) - 1
        summary[split] = dict(dir=str(out / split), samples=sum(sizes.values()), shards=len(sizes),
                              urls=str(out / split / f"shard-{{000000..{last:06d}}}.tar"),
                              bytes=sum((out / split / n).stat().st_size for n in sizes))
    return summary


def _is_complete(out: Path, params: dict) -> bool:
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
        if marker["params"] != params:
            return False
        for split in SPLITS:
            sizes = read_sizes(out / split)
            if sum(sizes.values()) != marker["samples"][split] or not all((out / split / n).is_file() for n in sizes):
                return False
        return (out / CONCEPTS_FILE).is_file()
    except (OSError, ValueError, KeyError):
        return False


def ensure_toy_shards(out_dir: Union[str, os.PathLike], seed: int = 0, force: bool = False, train_variants: int = 40,
                      val_variants: int = 8, image_size: int = 64, maxcount: Optional[int] = None) -> Path:
    """Build the toy set in ``out_dir`` unless a complete one with the same parameters is there.

    The set is built in a temporary sibling folder and renamed into place, so an interrupted build
    never leaves a half set that looks complete. An existing ``out_dir`` is replaced only when it holds
    nothing but toy-set files. With several processes, build on one rank first; a concurrent build is
    detected and its result reused.

    Args:
        out_dir: the toy set's folder.
        seed: generation seed.
        force: rebuild even when complete.
        train_variants, val_variants, image_size, maxcount: as in :func:`make_toy_shards`.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` exists, is incomplete and holds files the generator did not write.
    """
    out = Path(out_dir)
    params = dict(version=TOY_VERSION, seed=seed, train_variants=train_variants, val_variants=val_variants,
                  image_size=image_size, maxcount=maxcount)
    if not force and _is_complete(out, params):
        return out
    return build_in_place(out, lambda tmp: make_toy_shards(tmp, seed, train_variants, val_variants, image_size,
                                                           maxcount),
                          lambda: _is_complete(out, params), _OWNED, force, "toy set")


def build_in_place(out: Path, build, complete, owned, force: bool, what: str) -> Path:
    """Build a generated data folder in a temporary sibling and rename it into place.

    An interrupted build never looks complete; an existing folder is replaced only when it holds nothing
    but the generator's own names ``owned``; when several processes build at once, the first finished
    set is kept (``complete()`` tells whether ``out`` already holds one).

    Raises:
        FileExistsError: ``out`` is incomplete and holds files the generator did not write.
    """
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in owned)
        if foreign:
            raise FileExistsError(f"{out} is not a complete {what} and holds other files {foreign[:5]}; "
                                  f"refusing to replace it: choose an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        if not force and complete():  # another process finished first: keep its set
            return out
        if out.exists():  # move the old set aside first: a directory rename cannot replace a non-empty one
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, out)
        except OSError:
            if not complete():  # not another process's finished build: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    """CLI entry point: build (if needed) and print the summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m cultureclip.data.toy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete set exists")
    parser.add_argument("--train-variants", type=int, default=40)
    parser.add_argument("--val-variants", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    out = ensure_toy_shards(args.out, args.seed, args.force, args.train_variants, args.val_variants, args.image_size)
    summary = toy_summary(out)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
