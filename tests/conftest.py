"""Fixtures shared by the whole suite.

- `s3_server`: a real moto S3 server on loopback for the session, with the AWS environment pointing at it;
- `s3_bucket`: a fresh, uniquely named bucket on that server per test; `s3_fs` reaches it with s3fs;
- `image_corpus`: writes real photographs (from scikit-image) and a corpus of broken or unusual files, and
  says what `prepare_image` must make of each.
"""

from __future__ import annotations

import functools
import io
import logging
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# --------------------------------------------------------------------------------------------------------- S3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port) and point the AWS environment at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("AWS_ENDPOINT_URL", endpoint)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        for name in ("NO_PROXY", "no_proxy"):  # never send loopback traffic through a proxy
            patch.setenv(name, "127.0.0.1,localhost")
        try:
            yield endpoint
        finally:
            server.stop()


def _s3fs(endpoint: str):  # -> s3fs.S3FileSystem
    import s3fs

    # A private instance: fsspec's instance cache (and its listing cache) stays the pipeline's own.
    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)


@pytest.fixture
def s3_fs(s3_server: str):  # -> s3fs.S3FileSystem
    """An s3fs file system on the moto server, for the test's own uploads and checks."""
    return _s3fs(s3_server)


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh bucket with a unique name; yields the name (not a URI)."""
    fs = _s3fs(s3_server)
    name = f"test-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    fs.invalidate_cache()
    yield name


# ----------------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class CorpusFile:
    """A file of the corpus and what `pipeline.captioning.images.prepare_image` must make of it."""

    path: Path
    error: str | None  # the start of the expected error reason; None when it must decode
    mode: str | None = None  # the Pillow mode the file opens in (decodable files)
    size: tuple[int, int] | None = None  # the (width, height) prepare_image must report


# Error reasons, as prepare_image starts them.
EMPTY = "empty file"
TRUNCATED = "truncated or corrupt image"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED = "unsupported format"
OVER_LIMIT = "over the pixel limit"


@functools.cache
def photo(name: str) -> np.ndarray:
    """A photograph bundled with scikit-image (astronaut, chelsea, coffee, camera, ...), cached."""
    import skimage.data

    array = getattr(skimage.data, name)()
    array.setflags(write=False)
    return array


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def huge_bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit white PNG of any size, a few KB on disk, written without holding its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte, then the packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _corpus_bytes() -> dict[str, tuple[str, bytes, str | None, str | None, tuple[int, int] | None]]:
    """name -> (file name, bytes, expected error, mode, reported size)."""
    astronaut, chelsea, coffee, camera = photo("astronaut"), photo("chelsea"), photo("coffee"), photo("camera")
    files: dict[str, tuple[str, bytes, str | None, str | None, tuple[int, int] | None]] = {}

    def good(name: str, file_name: str, image: Image.Image, fmt: str, size: tuple[int, int] | None = None,
             **options: object) -> None:
        files[name] = (file_name, encode(image, fmt, **options), None, image.mode, size or image.size)

    # Good photographs.
    good("astronaut", "astronaut.jpg", Image.fromarray(astronaut), "JPEG", quality=90)
    good("chelsea", "chelsea.png", Image.fromarray(chelsea), "PNG")
    good("coffee", "coffee.jpg", Image.fromarray(coffee), "JPEG", quality=90)

    # Every mode a dataset mixes.
    good("grayscale", "grayscale.jpg", Image.fromarray(camera), "JPEG", quality=90)
    good("bilevel", "bilevel.png", Image.fromarray(camera > 128), "PNG")
    alpha = np.full(astronaut.shape[:2], 255, np.uint8)
    alpha[:, : astronaut.shape[1] // 2] = 0  # left half fully transparent
    good("rgba", "rgba.png", Image.fromarray(np.dstack([astronaut, alpha]), "RGBA"), "PNG")
    good("cmyk", "cmyk.jpg", Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=90)
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (128, 1))  # 16-bit horizontal ramp
    good("gray16", "gray16.png", Image.fromarray(ramp), "PNG")
    alpha = np.full(camera.shape, 255, np.uint8)
    alpha[: camera.shape[0] // 2] = 0  # top half fully transparent
    good("la", "la.png", Image.fromarray(np.dstack([camera, alpha]), "LA"), "PNG")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # 0: red (transparent), 1: blue
    palette.paste(1, (32, 0, 64, 64))  # right half blue
    good("palette_transparent", "palette_transparent.png", palette, "PNG", transparency=0)
    frames = [Image.new("RGB", (64, 48), colour).convert("P") for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    files["animated"] = ("animated.gif", encode(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                                duration=100, loop=0), None, "P", (64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored = Image.fromarray(chelsea)  # 451 x 300 as stored; 300 x 451 as displayed
    good("rotated", "rotated.jpg", stored, "JPEG", size=(stored.height, stored.width), quality=90, exif=exif)

    # Broken files, each with the reason it must give.
    whole = files["astronaut"][1]
    files["empty"] = ("empty.jpg", b"", EMPTY, None, None)
    files["truncated"] = ("truncated.jpg", whole[: len(whole) // 2], TRUNCATED, None, None)
    files["not_an_image"] = ("not_an_image.png", b"not an image\n" * 20, NOT_AN_IMAGE, None, None)
    files["heic"] = ("photo.heic", np.random.default_rng(0).bytes(4096), UNSUPPORTED, None, None)
    files["huge"] = ("huge.png", huge_bilevel_png(10_000, 10_000), OVER_LIMIT, None, (10_000, 10_000))
    return files


_CORPUS: dict[str, tuple[str, bytes, str | None, str | None, tuple[int, int] | None]] = {}

ImageCorpus = Callable[..., dict[str, CorpusFile]]


@pytest.fixture
def image_corpus(tmp_path: Path) -> ImageCorpus:
    """Factory: `image_corpus(folder=None, names=None)` writes the corpus and returns name -> CorpusFile.

    Names (all by default): good photographs `astronaut` (JPEG), `chelsea` (PNG), `coffee` (JPEG); modes
    `grayscale` (L), `bilevel` (1), `rgba` (left half transparent), `cmyk`, `gray16` (I;16 ramp), `la` (top
    half transparent), `palette_transparent` (P: left transparent red, right blue), `animated` (GIF: red,
    green, blue frames), `rotated` (JPEG, EXIF orientation 6); broken `empty`, `truncated` (half a JPEG),
    `not_an_image` (text named .png), `heic` (random bytes), `huge` (a valid 10000 x 10000 1-bit PNG of
    a few KB: 100 M pixels, over the default 64 M limit). Files are written flat into `folder` (default
    `<tmp_path>/corpus`).
    """

    def make(folder: Path | None = None, names: Iterable[str] | None = None) -> dict[str, CorpusFile]:
        if not _CORPUS:
            _CORPUS.update(_corpus_bytes())
        root = Path(folder) if folder is not None else tmp_path / "corpus"
        root.mkdir(parents=True, exist_ok=True)
        written = {}
        for name in names if names is not None else _CORPUS:
            file_name, data, error, mode, size = _CORPUS[name]
            path = root / file_name
            path.write_bytes(data)
            written[name] = CorpusFile(path, error, mode, size)
        return written

    return make
