"""Decoding untrusted image files to 8-bit RGB, and finding them on disk.

A file is read once into memory and decoded by Pillow under limits that do not trust it:

* only the formats of :data:`IMAGE_EXTENSIONS` are tried, whatever the name says (Pillow would
  otherwise also open, e.g., EPS files, which it renders by running Ghostscript);
* a declared size above ``max_pixels`` fails before any pixel is decoded (a 2 KB PNG can declare
  gigapixels): Pillow's ``DecompressionBombWarning`` is raised as an error, under our limit;
* data that ends early is an error: Pillow raises for a file cut short, and a PNG whose
  compressed rows stop before the last row (which Pillow fills with zeros) is caught by counting
  the decompressed bytes; ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False;
* EXIF orientation is applied, so a photo stored sideways is seen upright;
* every mode becomes 8-bit RGB by what its samples mean (:func:`rgb_array`).

The folder walk (:func:`list_images`) follows symbolic links, because datasets are often put
together from links, but walks each real folder once (no loops) and counts each real file once.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # what those extensions hold (Pillow opens MPO as JPEG)
MAX_IMAGE_PIXELS = 1 << 26  # 64 Mpx (8192 x 8192): above any training photo, 256 MiB once decoded to RGBA
WHITE = 255  # transparent pixels are shown over white, as on a page; the colour stored under them is arbitrary


class ImageError(ValueError):
    """An image file that cannot be decoded safely; the message says why."""


def decode_rgb_array(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file's bytes to a (H, W, 3) uint8 RGB array (first frame of animations)."""
    from PIL import Image, ImageFile, ImageOps

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, which decodes cut-off images "
                         "with grey or black rows; remove the code that sets it")
    try:
        with _pixel_limit(Image, max_pixels):
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(str(err).rstrip(".")) from None  # "Image size (N pixels) exceeds limit of M pixels, ..."
    except Image.UnidentifiedImageError:
        raise ImageError(f"it is not a {', '.join(FORMATS)} image") from None
    with image:
        if image.format == "PNG":
            check_png_rows(data)
        image.load()  # decode all of it now: data that ends early raises here
        ImageOps.exif_transpose(image, in_place=True)
        return rgb_array(image)


@contextmanager
def _pixel_limit(pil_image, max_pixels: int) -> Iterator[None]:
    """Pillow's size check (run when a file is opened, before any pixel is decoded) with our
    limit, and its warning raised as an error. Pillow keeps the limit in a module global, so it
    is set only while opening (decoding runs one file at a time per process)."""
    previous = pil_image.MAX_IMAGE_PIXELS
    pil_image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pil_image.DecompressionBombWarning)
            yield
    finally:
        pil_image.MAX_IMAGE_PIXELS = previous


def rgb_array(image) -> np.ndarray:
    """A Pillow image as (H, W, 3) uint8 RGB, converting each mode by what its samples mean.

    Pillow's own ``convert("RGB")`` clips 16-bit and 32-bit samples to 255 and float ones to
    0..1 of 255, so those are scaled here: integer grey (``I;16*``, and ``I``, which is how
    Pillow also opens 16-bit files) is 0..65535, float grey (``F``) is 0..1. Transparent
    pixels are composited over white. Grey, palette, CMYK, YCbCr, LAB and HSV go through
    Pillow's conversions.
    """
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        return _grey_to_rgb((grey * 255 + 32767) // 65535)
    if mode == "F":
        grey = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0)
        return _grey_to_rgb(np.rint(np.clip(grey, 0.0, 1.0) * 255))
    try:
        if mode in ("LA", "PA", "RGBA", "RGBa") or image.has_transparency_data:
            return _over_white(np.array(image.convert("RGBA")))
        return np.array(image.convert("RGB"))
    except ValueError as err:  # a mode Pillow cannot convert
        raise ImageError(f"its mode {mode} cannot be converted to RGB ({err})") from None


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha RGBA composited over white, rounded: (c * a + 255 * (255 - a)) / 255."""
    colour, alpha = rgba[..., :3].astype(np.int32), rgba[..., 3:].astype(np.int32)
    return ((colour * alpha + WHITE * (255 - alpha) + 127) // 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# PNG completeness
# ----------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type: grey, RGB, palette, grey+alpha, RGBA
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_data_size(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines a complete PNG image decompresses to (PNG spec sections 7-8):
    each row is one filter byte and its packed samples; Adam7 has seven passes of sub-images."""
    bits = _PNG_CHANNELS[colour_type] * bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = -(-max(width - x0, 0) // dx), -(-max(height - y0, 0) // dy)
        if cols and rows:
            total += rows * (1 + -(-cols * bits // 8))
    return total


def check_png_rows(data: bytes) -> None:
    """Raise :class:`ImageError` if the PNG's compressed image data holds fewer rows than its
    header declares (Pillow decodes such a file with the missing rows zero-filled)."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 33 or data[12:16] != b"IHDR":
        return  # not a plain PNG; Pillow reports what is wrong with it
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour_type not in _PNG_CHANNELS:
        return
    expected = png_data_size(width, height, bit_depth, colour_type, interlace == 1)
    inflate, found, pos = zlib.decompressobj(), 0, 8
    while pos + 8 <= len(data) and found < expected:
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            chunk = data[pos + 8:pos + 8 + length]
            while chunk and found < expected:  # bounded: never inflates more than the image needs
                try:
                    found += len(inflate.decompress(chunk, expected - found))
                except zlib.error as err:
                    raise ImageError(f"its PNG image data is damaged ({err})") from None
                chunk = inflate.unconsumed_tail
        elif kind == b"IEND":
            break
        pos += 12 + length
    if found < expected:
        raise ImageError(f"its PNG image data ends after {found} of {expected} bytes; rows are missing")


# ----------------------------------------------------------------------------------------------
# Finding images
# ----------------------------------------------------------------------------------------------
def list_images(root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                seen: Optional[dict[str, str]] = None) -> list[str]:
    """Image paths under ``root`` (recursively, sorted, hidden names skipped), each real file once.

    Symbolic links are followed, but a real folder is walked only once, so a link back to a
    parent cannot loop, and a real file reached twice is listed once. ``seen`` (real file ->
    path found at) is shared by the calls that list one dataset's class folders: a file that an
    earlier call found is an :class:`ImageError`, as one image cannot have two classes.
    Non-folder entries are listed even when they cannot be read (a dangling link), so that
    decoding reports them rather than the walk silently dropping them.
    """
    seen = {} if seen is None else seen
    found: list[str] = []
    mine: set[str] = set()
    visited: set[str] = set()
    stack = [root]
    while stack:
        directory = stack.pop()
        real = os.path.realpath(directory)
        if real in visited:
            continue
        visited.add(real)
        with os.scandir(directory) as entries:
            listed = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
        subdirs = []
        for entry in listed:
            if entry.is_dir():
                subdirs.append(entry.path)
            elif entry.name.lower().endswith(extensions):
                key = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if key in mine:
                    continue
                if key in seen:
                    raise ImageError(f"{entry.path} and {seen[key]} are the same file (through a link)")
                seen[key] = entry.path
                mine.add(key)
                found.append(entry.path)
        stack.extend(reversed(subdirs))  # depth first, in name order
    return found
