"""Decode and prepare one image the way JoyCaption expects it, or say why it cannot be.

JoyCaption squishes the image to 384 x 384 (no padding, no crop) with Lanczos, in RGB. JPEGs are
decoded in draft mode: libjpeg scales by 1/2, 1/4 or 1/8 during decoding while keeping both sides
at least 384, which makes large photographs several times cheaper to prepare. EXIF orientation is
applied, transparency is flattened onto white, and any mode (palette, CMYK, 16-bit, ...) becomes
RGB. Failures are data: the caller gets an error reason, never an exception.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SIZE = 384
# Formats people keep in image folders that Pillow cannot decode without plugins.
UNSUPPORTED_EXTENSIONS = frozenset({".heic", ".heif", ".jxl", ".svg", ".psd", ".raw", ".cr2", ".nef", ".dng"})
DECODABLE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".gif", ".tif",
                                  ".tiff", ".avif", ".ppm", ".pgm", ".pbm", ".tga", ".ico", ".jp2"})
IMAGE_EXTENSIONS = DECODABLE_EXTENSIONS | UNSUPPORTED_EXTENSIONS


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


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: scale the actual range into 8 bits.
        values = np.asarray(image, dtype=np.float64)
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


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    orientation = image.getexif().get(0x0112, 1)
    width, height = image.size
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prepare_image(data: bytes | None, name: str = "", max_pixels: int = 64_000_000, draft: bool = True) -> Prepared:
    """Decode `data` into JoyCaption's 384 x 384 RGB input, or return the reason it failed."""
    extension = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if not data:
        return _failed("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if extension in UNSUPPORTED_EXTENSIONS:
            return _failed(f"unsupported format: {extension} files cannot be decoded")
        return _failed("not an image: no decoder recognises the data")
    except Image.DecompressionBombError as err:  # past Pillow's own limit (2 x MAX_IMAGE_PIXELS): too big
        return _failed(f"over the pixel limit: {err}")
    except (OSError, ValueError) as err:
        return _failed(f"not an image: {err}")
    fmt = image.format
    width, height = _oriented_size(image)
    if width * height > max_pixels:
        return _failed(f"over the pixel limit: {width}x{height} exceeds {max_pixels} pixels", width, height, fmt)
    try:
        if draft and fmt == "JPEG":
            image.draft("RGB", (SIZE, SIZE))
        image.seek(0)  # animated images: the first frame
        image.load()
        image = ImageOps.exif_transpose(image) or image
        rgb = _to_rgb(image).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return _failed(f"truncated or corrupt image: {err}", width, height, fmt)
    return Prepared(rgb.tobytes(), width, height, fmt, None)


def pixels_to_image(pixels: bytes) -> Image.Image:
    """Rebuild the prepared PIL image from its bytes (in the caption actor)."""
    return Image.frombytes("RGB", (SIZE, SIZE), pixels)
