"""Decode and prepare one image the way JoyCaption expects it, or say why it cannot be.

JoyCaption squishes the image to 384 x 384 (no padding, no crop) with Lanczos, in RGB. JPEGs are
decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 during decoding while keeping both sides
at least 384, which makes large photographs several times cheaper to prepare. EXIF orientation is
applied, transparency is flattened onto white, and any mode (palette, CMYK, 16-bit, ...) becomes
RGB. The pixel limit is checked on the header's size (frame 0) before anything is decoded; a header
past twice the limit is refused by Pillow while opening (so no size is known). Failures are data: for
any bytes at all the caller gets an error reason, never an exception.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

SIZE = 384
# Formats people keep in image folders that Pillow cannot decode without plugins.
UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng"})
DECODABLE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif",
                                  ".tiff", ".avif", ".ppm", ".pgm", ".pbm", ".tga", ".ico", ".jp2"})
IMAGE_EXTENSIONS = DECODABLE_EXTENSIONS | UNSUPPORTED_EXTENSIONS

ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that shows the image upright (what ImageOps.exif_transpose does).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# What Pillow's plugins and C decoders raise on garbage. The fuzz (tests/unit/test_image_fuzz.py) sees
# OSError, ValueError, SyntaxError and RuntimeError (AVIF); the rest can leave plugins' header parsing
# (struct.error, IndexError, KeyError, EOFError, ...) or headers claiming huge tables (MemoryError).
PILLOW_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
                 ZeroDivisionError, OverflowError, MemoryError, RuntimeError, AssertionError)


@dataclass(frozen=True)
class Prepared:
    """A prepared image (384 x 384 x 3 uint8 bytes) with its original size, or an error."""

    pixels: bytes | None
    width: int | None
    height: int | None
    format: str | None
    error: str | None


def _failed(reason: str, width: int | None = None, height: int | None = None, fmt: str | None = None) -> Prepared:
    return Prepared(None, width, height, fmt, reason)


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__  # MemoryError() and friends carry no message


def _bomb(err: Image.DecompressionBombError, max_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow: "Image size (81000000 pixels) exceeds ..."
    return f"over the pixel limit: {found[1]} pixels exceed {max_pixels}" if found else f"over the pixel limit: {err}"


class _PillowLimit:
    """Pillow's decompression-bomb limit follows `max_pixels` while any prepare_image call runs.

    Pillow reads the process-wide Image.MAX_IMAGE_PIXELS when it opens a file and again inside plugins
    (GIF frames that grow the canvas, ICO and MPO sub-images, TIFF tiles, the WebP canvas it allocates
    while opening) and refuses anything over twice that value. Left as it is, it would refuse images a
    larger max_pixels allows; set to max_pixels, those sizes we cannot see from outside stay bounded by
    our limit too (frame 0 is checked exactly). The caller's value returns when the last call ends;
    concurrent calls share the value set last (a run has one max_pixels).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: int | None = None

    @contextmanager
    def __call__(self, max_pixels: int) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
            self._users += 1
            Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pillow_limit = _PillowLimit()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: the actual range into 8 bits; NaN and infinities count as 0.
        with np.errstate(invalid="ignore"):  # widening a signalling NaN (float TIFFs) warns, harmlessly
            values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _orientation(image: Image.Image, decoded: bool) -> int:
    """The EXIF orientation (1 when absent or unreadable), found without decoding pixels.

    PNG's getexif() decodes the whole image to look for an eXIf chunk after the pixel data, so before
    decoding a PNG only an eXIf chunk already read with its header counts. A corrupt EXIF block says
    nothing about the pixels: the image is then shown as stored.
    """
    if not decoded and image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        orientation = image.getexif().get(ORIENTATION, 1)
        return orientation if orientation in UPRIGHT else 1
    except PILLOW_ERRORS:
        return 1


def _oriented(width: int, height: int, orientation: int) -> tuple[int, int]:
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _decode(image: Image.Image, draft: bool) -> tuple[bytes, int]:
    """JoyCaption's input made of frame 0, and the orientation applied; raises what Pillow raises."""
    if draft and image.format == "JPEG":
        image.draft("RGB", (SIZE, SIZE))
    image.seek(0)  # animated images: the first frame
    image.load()
    orientation = _orientation(image, decoded=True)
    method = UPRIGHT.get(orientation)
    upright = image.transpose(method) if method is not None else image
    return _to_rgb(upright).resize((SIZE, SIZE), Image.Resampling.LANCZOS).tobytes(), orientation


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image | Prepared:
    """The image with its header read and nothing decoded (ICO aside), or why there is none."""
    extension = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if extension in UNSUPPORTED_EXTENSIONS:
            return _failed(f"unsupported format: {extension} files cannot be decoded")
        return _failed("not an image: no decoder recognises the data")
    except Image.DecompressionBombError as err:  # over twice max_pixels: Pillow refuses it while opening
        return _failed(_bomb(err, max_pixels))
    except PILLOW_ERRORS as err:  # a decoder took the first bytes, then the header fell apart
        return _failed(f"not an image: {_describe(err)}")


def _prepare(data: bytes, name: str, max_pixels: int, draft: bool) -> Prepared:
    image = _open(data, name, max_pixels)
    if isinstance(image, Prepared):
        return image
    fmt, stored = image.format, image.size  # frame 0, from the header alone
    too_big = stored[0] * stored[1] > max_pixels  # decided before anything may decode; orientation only swaps
    width, height = _oriented(*stored, _orientation(image, decoded=False))
    if too_big:
        return _failed(f"over the pixel limit: {width}x{height} exceeds {max_pixels} pixels", width, height, fmt)
    try:
        pixels, orientation = _decode(image, draft)
    except Image.DecompressionBombError as err:  # a frame or tile past the limit that the header hid
        return _failed(_bomb(err, max_pixels), width, height, fmt)
    except PILLOW_ERRORS as err:
        return _failed(f"truncated or corrupt image: {_describe(err)}", width, height, fmt)
    # Decoding may have found the orientation (a PNG's eXIf chunk after its pixel data).
    return Prepared(pixels, *_oriented(*stored, orientation), fmt, None)


def prepare_image(data: bytes | None, name: str = "", max_pixels: int = 64_000_000, draft: bool = True) -> Prepared:
    """Decode `data` into JoyCaption's 384 x 384 RGB input, or return the reason it failed; never raises."""
    if not data:
        return _failed("empty file (0 bytes)")
    try:
        with _pillow_limit(max_pixels), warnings.catch_warnings():
            # Over max_pixels Pillow warns, and the file is refused anyway. Its warnings about corrupt data
            # repeat the reason the row gets, for every such file: at scale they would flood worker logs.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            return _prepare(data, name, max_pixels, draft)
    except Exception as err:
        # The poison-pill boundary. Pillow has dozens of plugins and C decoders, and garbage can make any
        # of them raise something the lists above do not name; one bad file must cost one error row, never
        # the batch or the worker (which Ray would retry on the same file, forever).
        return _failed(f"corrupt image ({type(err).__name__}: {_describe(err)})")


def pixels_to_image(pixels: bytes) -> Image.Image:
    """Rebuild the prepared PIL image from its bytes (in the caption actor)."""
    return Image.frombytes("RGB", (SIZE, SIZE), pixels)
