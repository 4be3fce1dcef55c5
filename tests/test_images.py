"""Tests for cultureclip.images: 8-bit conversion against numpy references built from hand-written
files (PNG and PGM bytes assembled here, not by Pillow), the header-only pixel cap, errors, skip counts."""
import io
import logging
import pickle
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from cultureclip import images as I


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(arr: np.ndarray, color_type: int, depth: int = 16, size=None, idat=None) -> bytes:
    """A PNG written by hand: filter 0 on every row; ``size`` overrides the IHDR (w, h), ``idat`` the data."""
    h, w = arr.shape[:2]
    raw = arr.astype(">u2" if depth == 16 else "u1").tobytes()
    row = len(raw) // h
    data = b"".join(b"\x00" + raw[i * row:(i + 1) * row] for i in range(h))
    w, h = size or (w, h)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data) if idat is None else idat) + chunk(b"IEND", b""))


def pixels(source, **kw) -> np.ndarray:
    image = I.decode_image(source, **kw)
    assert image.mode == "RGB"
    return np.asarray(image)


def over_white(rgb8: np.ndarray, alpha8: np.ndarray) -> np.ndarray:
    """Reference alpha compositing over white, in floats: round(c * a + 255 * (1 - a)), a in [0, 1]."""
    a = alpha8.astype(np.float64)[..., None] / 255
    return np.round(rgb8 * a + 255 * (1 - a)).astype(np.uint8)


RNG = np.random.default_rng(0)


def test_16bit_gray_png_is_scaled_not_clipped():
    values = RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
    values[0, :3] = [0, 255, 65535]  # extremes and a value a clip would keep
    data = png_bytes(values, color_type=0)
    got = pixels(data)
    expected = (values >> 8).astype(np.uint8)  # the documented rule: the high byte
    assert np.array_equal(got, np.repeat(expected[..., None], 3, axis=2))
    # what the old path did: Pillow's convert("RGB") clips 16-bit values to white
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean() > 240 > 140 > got.mean()


def test_16bit_rgb_and_rgba_pngs():
    rgb = RNG.integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    assert np.array_equal(pixels(png_bytes(rgb, color_type=2)), (rgb >> 8).astype(np.uint8))
    rgba = RNG.integers(0, 65536, (5, 4, 4), dtype=np.uint16)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 65535  # fully transparent -> white, opaque -> the colour
    got = pixels(png_bytes(rgba, color_type=6))
    expected = over_white((rgba[..., :3] >> 8).astype(np.uint8), (rgba[..., 3] >> 8).astype(np.uint8))
    assert np.array_equal(got, expected)
    assert tuple(got[0, 0]) == (255, 255, 255) and np.array_equal(got[0, 1], rgba[0, 1, :3] >> 8)
    la = RNG.integers(0, 65536, (3, 4, 2), dtype=np.uint16)
    gray = np.repeat((la[..., :1] >> 8).astype(np.uint8), 3, axis=2)
    assert np.array_equal(pixels(png_bytes(la, color_type=4)), over_white(gray, (la[..., 1] >> 8).astype(np.uint8)))


def test_I_mode_from_16bit_pgm_and_float_tiff():
    values = RNG.integers(0, 65536, (3, 5), dtype=np.uint16)
    pgm = b"P5\n5 3\n65535\n" + values.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    assert np.array_equal(pixels(pgm)[..., 0], (values >> 8).astype(np.uint8))

    floats = np.array([[0.0, 0.25, 0.5, 1.0, 1.5, -0.5, np.nan]], dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(floats, mode="F").save(buf, format="TIFF")
    got = pixels(buf.getvalue())[0, :, 0]
    assert got.tolist() == [0, 64, 128, 255, 255, 0, 0]  # round(clip(v, 0, 1) * 255), NaN -> 0


def test_palette_with_transparency_and_plain_modes():
    pal = Image.new("P", (3, 2))
    pal.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    pal.putdata([0, 1, 0, 1, 1, 0])
    pal.info["transparency"] = 0  # index 0 transparent
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    got = pixels(buf.getvalue())
    expected = np.array([[255, 255, 255], [10, 200, 10]], dtype=np.uint8)[[0, 1, 0, 1, 1, 0]].reshape(2, 3, 3)
    assert np.array_equal(got, expected)
    for mode in ("RGB", "L", "CMYK", "1"):  # 8-bit modes without alpha: Pillow's own conversion
        im = Image.fromarray(RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)).convert(mode)
        assert np.array_equal(pixels(im), np.asarray(im.convert("RGB")))


def test_pixel_cap_and_error_names_the_source(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(path)
    with pytest.raises(I.ImageTooLargeError, match=r"big.png: image too large: .*100x100 = 10000 pixels") as err:
        I.decode_image(path, max_pixels=64 * 64)
    assert err.value.reason == I.TOO_LARGE and isinstance(err.value, ValueError)
    assert pixels(path, max_pixels=100 * 100).shape == (100, 100, 3) and pixels(path, max_pixels=None).any()
    with pytest.raises(I.ImageDecodeError, match=r"shard-000001.tar sample p7 member pos.png: cannot decode") as err:
        I.decode_image(b"not an image", name="shard-000001.tar sample p7 member pos.png")
    assert err.value.reason == I.BAD_IMAGE and err.value.detail.startswith("UnidentifiedImageError")
    clone = pickle.loads(pickle.dumps(err.value))  # errors travel from loader workers
    assert (type(clone), str(clone), clone.reason, clone.detail) == (I.ImageDecodeError, str(err.value),
                                                                   I.BAD_IMAGE, err.value.detail)
    with pytest.raises(I.ImageDecodeError, match="neither 'bytes' nor 'path'"):
        I.decode_image({"bytes": None, "path": None})
    with pytest.raises(TypeError):
        I.decode_image(12345)


def test_declared_size_is_refused_from_the_header_without_decoding():
    row = np.zeros((1, 100, 3), dtype=np.uint8)
    broken = png_bytes(row, color_type=2, depth=8, size=(100, 100), idat=b"not zlib data")
    with pytest.raises(I.ImageDecodeError) as err:  # decoded, its pixel data is garbage ...
        I.decode_image(broken, max_pixels=None)
    assert err.value.reason == I.BAD_IMAGE
    # ... so "too large" for a declared 8000x8000 (192 MB of RGB) proves the check ran before decoding
    huge = png_bytes(row, color_type=2, depth=8, size=(8000, 8000), idat=b"not zlib data")
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for _ in range(20):
        with pytest.raises(I.ImageTooLargeError, match="8000x8000"):
            I.decode_image(huge)
    assert time.perf_counter() - start < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: nothing allocated
    # beyond Pillow's own limit too: its DecompressionBombError is reported the same way
    bomb = png_bytes(row, color_type=2, depth=8, size=(20000, 20000), idat=b"not zlib data")
    with pytest.raises(I.ImageTooLargeError):
        I.decode_image(bomb, max_pixels=None)


def test_image_to_bytes(tmp_path):
    data = png_bytes(RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8), color_type=2, depth=8)
    assert I.image_to_bytes(data) == (data, "png")  # passed through untouched
    gray16 = np.full((40, 60), 40000, dtype=np.uint16)
    jpg, ext = I.image_to_bytes(png_bytes(gray16, color_type=0), resize=20)
    assert ext == "jpg"
    out = np.asarray(Image.open(io.BytesIO(jpg)))
    assert out.shape == (20, 30, 3) and np.abs(out.astype(int) - (40000 >> 8)).max() <= 2  # not white
    with pytest.raises(I.ImageTooLargeError):
        I.image_to_bytes(data, max_pixels=10)
    with pytest.raises(I.ImageDecodeError, match="x.png"):
        I.image_to_bytes(data[:60], name="x.png")


def test_skip_counter_rate_limits_its_log(caplog):
    counter = I.SkipCounter(log_first=3, log_every=100, log_interval=3600)
    with caplog.at_level(logging.WARNING, logger=I.__name__):
        for i in range(1000):
            counter.add(I.BAD_IMAGE if i % 4 else I.TOO_LARGE, f"item {i}", "broken")
        counter.flush()
    assert counter.by_reason == {I.BAD_IMAGE: 750, I.TOO_LARGE: 250} and counter.total == 1000
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 + 10  # three single lines, then one summary per 100 skips (the last by flush)
    assert lines[0] == "skipped item 0 (too_large): broken"
    assert lines[-1] == ("skipped 97 more (total 1000: bad_image 750, too_large 250); "
                         "latest: item 999 (bad_image): broken")
    assert counter.take_unreported() == 1000 and counter.take_unreported() == 0
    with pytest.raises(ValueError, match="on_error"):
        I.check_on_error("ignore")
