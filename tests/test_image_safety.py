"""Image files are untrusted: declared sizes are limited, every mode becomes the right 8-bit RGB,
EXIF orientation is applied, data that ends early is an error, and the folder walk neither loops
through links nor counts an image twice (issue 20, class 5)."""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from simclrv2.data.datasets import build_dataset
from simclrv2.data.errors import DataError
from simclrv2.data.folder import ImageFolderDataset, decode_rgb


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, raw: bytes, interlace: int = 0) -> bytes:
    """A PNG written by hand from already filtered scanlines ``raw`` (PNG spec sections 7-11)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, interlace)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _scanlines(array: np.ndarray) -> bytes:
    """Rows of a (H, W, C) uint8/uint16 array, each with filter byte 0, samples big-endian."""
    rows = array.astype(array.dtype.newbyteorder(">")).reshape(array.shape[0], -1)
    return b"".join(b"\0" + row.tobytes() for row in rows)


def _adam7(array: np.ndarray) -> bytes:
    """The seven interlaced passes of ``array``, each as scanlines."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    return b"".join(_scanlines(array[y0::dy, x0::dx]) for x0, y0, dx, dy in passes
                    if array[y0::dy, x0::dx].size)


def _folder(tmp_path: Path, name: str, data: bytes) -> ImageFolderDataset:
    (tmp_path / "c").mkdir(exist_ok=True)
    (tmp_path / "c" / name).write_bytes(data)
    return ImageFolderDataset(tmp_path, image_size=8, mode="decode")


# ------------------------------------------------------------------------------------------------
# Declared size
# ------------------------------------------------------------------------------------------------
def _bomb(width: int, height: int) -> bytes:
    """A tiny 1-bit PNG declaring ``width`` x ``height`` but holding a few rows (not a valid image)."""
    return _png(width, height, 1, 0, b"\0" * 8)


def test_a_huge_declared_size_fails_before_decoding(tmp_path):
    ds = _folder(tmp_path, "bomb.png", _bomb(10_000, 10_000))  # 100 Mpx in 100 bytes
    assert (tmp_path / "c" / "bomb.png").stat().st_size < 2048
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may stand in for the error
        with pytest.raises(DataError, match=r"bomb.png: Image size \(100000000 pixels\) exceeds limit of 67108864 "
                                            r"pixels.*decompression bomb"):
            ds.load(0)


def test_the_pixel_limit_is_set_per_dataset_and_pillows_warning_is_an_error(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "c").mkdir()
    os.replace(tmp_path / "small.png", tmp_path / "c" / "small.png")
    with pytest.raises(DataError, match=r"\(400 pixels\) exceeds limit of 399 pixels"):
        ImageFolderDataset(tmp_path, image_size=8, max_pixels=399).load(0)
    assert ImageFolderDataset(tmp_path, image_size=8, max_pixels=400).load(0).shape == (3, 8, 8)
    with pytest.raises(DataError, match=r"\(400 pixels\) exceeds limit of 398 pixels"):  # Pillow's error at 2x
        ImageFolderDataset(tmp_path, image_size=8, max_pixels=199).load(0)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's default, as it was


def test_skip_bad_images_skips_a_bomb(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a_bomb.png").write_bytes(_bomb(20_000, 5_000))
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(tmp_path / "c" / "b_fine.png")
    ds = ImageFolderDataset(tmp_path, image_size=8, mode="decode", skip_bad_images=True)
    with pytest.warns(UserWarning, match="a_bomb.png"):
        image, _, skipped = ds[0]
    assert skipped == 1 and image.shape == (3, 10, 10)


# ------------------------------------------------------------------------------------------------
# Modes: each against a numpy computation of what its samples mean
# ------------------------------------------------------------------------------------------------
RNG = np.random.default_rng(0)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.rint(colour.astype(np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)


def _sixteen_bit(tmp):
    v = RNG.integers(0, 65536, (6, 7)).astype(np.uint16)
    v[0, :3] = [0, 65535, 32768]
    Image.fromarray(v).save(tmp / "a.png")
    assert Image.open(tmp / "a.png").mode.startswith("I")
    return _grey(np.rint(v / 65535 * 255))


def _thirty_two_bit(tmp):
    v = RNG.integers(-1000, 70000, (6, 7)).astype(np.int32)
    Image.fromarray(v, mode="I").save(tmp / "a.tif")
    return _grey(np.rint(np.clip(v, 0, 65535) / 65535 * 255))


def _float(tmp):
    v = RNG.uniform(-0.5, 1.5, (6, 7)).astype(np.float32)
    v[0, 0] = np.nan
    Image.fromarray(v, mode="F").save(tmp / "a.tif")
    return _grey(np.rint(np.clip(np.nan_to_num(v, nan=0.0), 0, 1) * 255))


def _grey_alpha(tmp):
    la = RNG.integers(0, 256, (6, 7, 2)).astype(np.uint8)
    Image.fromarray(la, mode="LA").save(tmp / "a.png")
    return _over_white(np.repeat(la[..., :1], 3, axis=2), la[..., 1])


def _rgba(tmp):
    rgba = RNG.integers(0, 256, (6, 7, 4)).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp / "a.png")
    return _over_white(rgba[..., :3], rgba[..., 3])


def _palette_with_transparency(tmp):
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 4, (6, 7)).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp / "a.png", transparency=2)
    expected = palette[index]
    expected[index == 2] = 255
    return expected


def _palette(tmp):
    palette = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    index = RNG.integers(0, 256, (6, 7)).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.ravel().tolist())
    image.save(tmp / "a.gif")
    return palette[index]


def _cmyk(tmp):
    cmyk = RNG.integers(0, 256, (6, 7, 4)).astype(np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp / "a.tif")
    k = cmyk[..., 3:].astype(np.float64)
    return np.rint((255 - cmyk[..., :3]) * (255 - k) / 255).astype(np.uint8)


def _bilevel(tmp):
    bits = RNG.integers(0, 2, (6, 7)).astype(bool)
    Image.fromarray(bits).save(tmp / "a.png")
    return _grey(bits * 255)


def _luminance(tmp):
    v = RNG.integers(0, 256, (6, 7)).astype(np.uint8)
    Image.fromarray(v, mode="L").save(tmp / "a.bmp")
    return _grey(v)


def _rgb(tmp):
    rgb = RNG.integers(0, 256, (6, 7, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp / "a.webp", lossless=True)
    return rgb


MODES = {"I;16": _sixteen_bit, "I": _thirty_two_bit, "F": _float, "LA": _grey_alpha, "RGBA": _rgba,
         "P+transparency": _palette_with_transparency, "P": _palette, "CMYK": _cmyk, "1": _bilevel, "L": _luminance,
         "RGB": _rgb}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_becomes_the_right_8_bit_rgb(tmp_path, mode):
    expected = MODES[mode](tmp_path)
    (path,) = tmp_path.iterdir()
    decoded = decode_rgb(path).permute(1, 2, 0).numpy()
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    tolerance = 1 if mode == "CMYK" else 0  # Pillow's integer arithmetic
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= tolerance


# ------------------------------------------------------------------------------------------------
# EXIF orientation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation, upright", [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]),
                                                  (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(tmp_path, orientation, upright):
    stored = RNG.integers(0, 256, (4, 9, 3)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    decoded = decode_rgb(tmp_path / "photo.png").permute(1, 2, 0).numpy()
    assert np.array_equal(decoded, upright(stored))


# ------------------------------------------------------------------------------------------------
# Data that ends early
# ------------------------------------------------------------------------------------------------
PNG_CASES = {  # (bit depth, colour type, sample dtype, channels)
    "rgb8": (8, 2, np.uint8, 3), "grey16": (16, 0, np.uint16, 1), "rgba16": (16, 6, np.uint16, 4),
    "grey_alpha8": (8, 4, np.uint8, 2)}


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("case", PNG_CASES)
def test_png_with_missing_rows_is_an_error(tmp_path, case, interlace):
    depth, colour_type, dtype, channels = PNG_CASES[case]
    array = RNG.integers(0, np.iinfo(dtype).max + 1, (13, 11, channels)).astype(dtype)
    raw = _adam7(array) if interlace else _scanlines(array)
    complete = tmp_path / "complete.png"
    complete.write_bytes(_png(11, 13, depth, colour_type, raw, interlace))
    decode_rgb(complete)  # the whole image: no false alarm
    if channels >= 3 and depth == 8:  # Pillow keeps 8-bit colour samples as they are
        assert np.array_equal(decode_rgb(complete).permute(1, 2, 0).numpy(), array[..., :3] if channels == 3
                              else _over_white(array[..., :3], array[..., 3]))
    # a valid compressed stream of whole rows, but too few: without the last 3 rows, or the last pass
    kept = _adam7(array)[:-len(_scanlines(array[1::2]))] if interlace else _scanlines(array[:-3])
    short = tmp_path / "short.png"
    short.write_bytes(_png(11, 13, depth, colour_type, kept, interlace))
    with pytest.raises(ValueError, match="rows are missing"):
        decode_rgb(short)
    short.write_bytes(_png(11, 13, depth, colour_type, raw[:-len(raw) // 5 - 1], interlace))  # ends mid-row
    with pytest.raises(ValueError, match="rows are missing"):
        decode_rgb(short)


def test_cut_files_are_errors_and_truncated_loading_is_refused(tmp_path, monkeypatch):
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cut.jpg").write_bytes(data[:len(data) // 2])
    ds = ImageFolderDataset(tmp_path / "c", image_size=8, labelled=False)
    with pytest.raises(DataError, match="cut.jpg.*truncated"):
        ds.load(0)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="LOAD_TRUNCATED_IMAGES"):
        ds.load(0)


def test_only_image_formats_are_opened_whatever_the_name(tmp_path):
    """Pillow would run Ghostscript for an EPS file; one named .jpg is refused unopened."""
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(DataError, match="x.jpg: it is not a JPEG, PNG"):
        ImageFolderDataset(tmp_path, image_size=8).load(0)


# ------------------------------------------------------------------------------------------------
# The folder walk
# ------------------------------------------------------------------------------------------------
def _write(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)


def test_links_are_followed_once_without_loops(tmp_path):
    root = tmp_path / "train"
    _write(root / "cat" / "a.png")
    _write(root / "cat" / "deep" / "b.png")
    os.symlink(root / "cat", root / "cat" / "deep" / "loop")  # a link back up
    os.symlink(root / "cat" / "a.png", root / "cat" / "again.png")  # the same file twice in its class
    _write(tmp_path / "elsewhere" / "d.png")
    os.symlink(tmp_path / "elsewhere", root / "dog")  # a class folder that is a link
    ds = ImageFolderDataset(root, image_size=8)
    assert ds.sample_ids == ["cat/a.png", "cat/deep/b.png", "dog/d.png"]
    assert ds.targets == [0, 0, 1]
    flat = build_dataset("folder", root, "train", image_size=8)  # no split folders: all of it, unlabelled
    assert flat.sample_ids == ["cat/a.png", "cat/deep/b.png", "dog/d.png"]


def test_one_file_under_two_classes_is_an_error(tmp_path):
    _write(tmp_path / "cat" / "a.png")
    _write(tmp_path / "dog" / "b.png")
    os.symlink(tmp_path / "cat" / "a.png", tmp_path / "dog" / "a_too.png")
    with pytest.raises(DataError, match=r"dog/a_too.png and .*cat/a.png are the same file.*two class folders"):
        ImageFolderDataset(tmp_path, image_size=8)


def test_the_command_line_reports_a_bomb_in_one_line_or_skips_it(tmp_path, capsys):
    from cli_checks import expect_one_line_error

    for i in range(4):
        _write(tmp_path / "photos" / f"{i}.png", 40 * i)
    (tmp_path / "photos" / "4_bomb.png").write_bytes(_bomb(10_000, 10_000))  # Pillow only warns at this size
    args = ["pretrain", "--dataset", "folder", "--data-dir", tmp_path / "photos", "--image-size", "16",
            "--resnet-depth", "18", "--width-multiplier", "0.125", "--train-batch-size", "5", "--train-steps", "1",
            "--num-workers", "0", "--progress", "false", "--precision", "fp32", "--num-threads", "1"]
    expect_one_line_error(capsys, [*args, "--run-dir", tmp_path / "a"], "4_bomb.png", "exceeds limit",
                          "--skip-bad-images")
    from simclrv2.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([str(a) for a in [*args, "--run-dir", tmp_path / "b", "--skip-bad-images", "true"]]) == 0
