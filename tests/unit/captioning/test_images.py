"""captioning.images.prepare_image: every mode becomes JoyCaption's 384 x 384 RGB input, failures are reasons."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile

from pipeline.captioning import images
from pipeline.captioning.images import SIZE, pixels_to_image, prepare_image
from tests.conftest import encode, huge_bilevel_png

GOOD = ("astronaut", "chelsea", "coffee")
MODES = ("grayscale", "bilevel", "rgba", "cmyk", "gray16", "la", "palette_transparent", "animated", "rotated")
BROKEN = ("empty", "truncated", "not_an_image", "heic", "huge")
EXPECTED_MODES = {"grayscale": "L", "bilevel": "1", "rgba": "RGBA", "cmyk": "CMYK", "gray16": "I;16", "la": "LA",
                  "palette_transparent": "P", "animated": "P", "rotated": "RGB"}


def _jpeg(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def _prepare(path, **options):  # (Path, ...) -> Prepared
    return prepare_image(path.read_bytes(), path.name, **options)


def _array(pixels: bytes | None) -> np.ndarray:
    assert pixels is not None
    return np.frombuffer(pixels, np.uint8).reshape(SIZE, SIZE, 3)


@pytest.fixture
def files(image_corpus):  # -> dict[str, CorpusFile]
    return image_corpus()


@pytest.mark.parametrize("name", BROKEN)
def test_broken_file_gives_its_reason(files, name: str) -> None:
    item = files[name]
    prepared = _prepare(item.path)
    assert prepared.pixels is None
    assert prepared.error is not None and prepared.error.startswith(item.error), prepared.error


def test_reasons_are_specific(files) -> None:
    assert _prepare(files["empty"].path).error == "empty file (0 bytes)"
    assert "truncated" in (_prepare(files["truncated"].path).error or "")
    huge = _prepare(files["huge"].path)
    assert (huge.width, huge.height, huge.format) == (10_000, 10_000, "PNG")  # header read, pixels never decoded
    assert "10000x10000" in (huge.error or "")
    # Random bytes are "not an image" unless the extension names a format Pillow cannot read.
    noise = np.random.default_rng(1).bytes(2048)
    assert (prepare_image(noise, "x.jpg").error or "").startswith("not an image")
    assert (prepare_image(noise, "x.HEIC").error or "").startswith("unsupported format: .heic")
    assert prepare_image(None).error == "empty file (0 bytes)"


def test_pixel_limit_is_the_configured_one(files) -> None:
    path = files["astronaut"].path  # 512 x 512
    assert _prepare(path, max_pixels=512 * 512).error is None
    over = _prepare(path, max_pixels=512 * 512 - 1)
    assert over.error is not None and over.error.startswith("over the pixel limit")
    assert (over.width, over.height) == (512, 512)


def test_max_pixels_not_pillows_global_limit_decides(files, monkeypatch) -> None:
    # Pillow refuses over 2 x Image.MAX_IMAGE_PIXELS (a process global); max_pixels must win both ways.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    for name in ("astronaut", "animated", "rgba"):  # 262 144, 3 072 and 262 144 pixels: over Pillow's 20 000
        assert _prepare(files[name].path).error is None, name
    assert _prepare(files["astronaut"].path, max_pixels=512 * 512 - 1).error.startswith("over the pixel limit")
    assert Image.MAX_IMAGE_PIXELS == 10_000  # the caller's value is back
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's check off: ours still holds
    assert _prepare(files["huge"].path).error.startswith("over the pixel limit: 10000x10000")
    assert Image.MAX_IMAGE_PIXELS is None


def test_headers_past_twice_the_limit_are_refused_while_opening(files) -> None:
    prepared = _prepare(files["huge"].path, max_pixels=1_000_000)  # Pillow's own check, set from max_pixels
    assert prepared.error == "over the pixel limit: 100000000 pixels exceed 1000000"
    assert prepared.pixels is None


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _exif_after_pixels(png: bytes, orientation: int = 6) -> bytes:
    """The PNG with an eXIf chunk after its pixel data (just before IEND): Pillow meets it while decoding."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png[:-12] + _png_chunk(b"eXIf", exif.tobytes()) + png[-12:]


def _jpeg_claiming(width: int, height: int, orientation: int = 1) -> bytes:
    """A small JPEG whose frame header (SOF0) claims another size."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(Image.new("RGB", (64, 48), (200, 40, 40)), exif=exif)
    at = data.index(b"\xff\xc0")
    return data[:at + 5] + struct.pack(">HH", height, width) + data[at + 9:]


def _animated_gif_claiming(width: int, height: int) -> bytes:
    """Three small frames on a logical screen of another size (what frame 0 is drawn on)."""
    frames = [Image.new("RGB", (64, 48), colour).convert("P") for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


@pytest.fixture
def decodes(monkeypatch):  # -> list[str]: the formats whose pixels were decoded
    calls: list[str] = []
    for cls in (Image.Image, ImageFile.ImageFile):
        original = cls.load

        def spy(self, original=original):  # (Image.Image) -> object
            calls.append(self.format or "?")
            return original(self)

        monkeypatch.setattr(cls, "load", spy)
    return calls


@pytest.mark.parametrize(("data", "size"), [
    pytest.param(_exif_after_pixels(huge_bilevel_png(5_000, 5_000)), (5_000, 5_000), id="png-25M-exif-after"),
    pytest.param(_exif_after_pixels(huge_bilevel_png(9_000, 9_000)), None, id="png-81M-exif-after"),
    pytest.param(_jpeg_claiming(5_000, 4_000, orientation=6), (4_000, 5_000), id="jpeg-20M-rotated"),
    pytest.param(_jpeg_claiming(60_000, 60_000), None, id="jpeg-3600M"),
    pytest.param(_animated_gif_claiming(5_000, 5_000), (5_000, 5_000), id="gif-animated-25M"),
])
def test_size_refusal_decodes_nothing(data: bytes, size: tuple[int, int] | None, decodes: list[str]) -> None:
    # Before the fix getexif() decoded a PNG to look for an eXIf chunk after its pixel data, before the
    # size check: the issue measured 0.49 s and 311 MiB to refuse a 9000 x 9000 one.
    prepared = prepare_image(data, "big", max_pixels=16_000_000)
    assert prepared.error is not None and prepared.error.startswith("over the pixel limit"), prepared.error
    assert decodes == [], f"pixels were decoded before the refusal: {decodes}"
    assert (prepared.width, prepared.height) == (size or (None, None))  # None: past twice the limit


def test_size_check_spy_sees_real_decoding(files, decodes: list[str]) -> None:
    assert _prepare(files["chelsea"].path).error is None
    assert decodes  # the spy above would notice a decode


@pytest.mark.parametrize("exif_after_pixels", [False, True])
def test_png_cut_in_its_pixel_data_is_a_reason(files, exif_after_pixels: bool) -> None:
    png = files["chelsea"].path.read_bytes()  # 451 x 300
    png = _exif_after_pixels(png) if exif_after_pixels else png
    prepared = prepare_image(png[: len(png) // 2], "cut.png")
    assert prepared.error is not None and prepared.error.startswith("truncated or corrupt image"), prepared.error
    assert (prepared.width, prepared.height, prepared.format) == (451, 300, "PNG")


def test_png_orientation_after_the_pixel_data_is_applied(files) -> None:
    prepared = prepare_image(_exif_after_pixels(files["chelsea"].path.read_bytes()), "rotated.png")
    assert prepared.error is None
    assert (prepared.width, prepared.height) == (300, 451)  # as displayed
    upright = Image.fromarray(skimage.data.chelsea()).transpose(Image.Transpose.ROTATE_270)
    expected = _array(prepare_image(encode(upright, "PNG"), "upright.png").pixels)
    assert (_array(prepared.pixels) == expected).all()


def test_float_images_with_nan_and_infinity() -> None:
    values = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (32, 1))
    values[0, :3] = (np.nan, np.inf, -np.inf)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value in cast" would mean garbage pixels
        prepared = prepare_image(encode(Image.fromarray(values, "F"), "TIFF"), "float.tif")
    assert prepared.error is None, prepared.error
    assert _array(prepared.pixels).max() >= 250


def test_unexpected_exceptions_become_reasons(files, monkeypatch) -> None:
    class StrangeError(Exception):
        pass

    def explode(image):  # (Image.Image) -> Image.Image
        raise StrangeError("nobody expects this")

    monkeypatch.setattr(images, "_to_rgb", explode)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_345)
    prepared = _prepare(files["chelsea"].path)
    assert prepared.error == "corrupt image (StrangeError: nobody expects this)"
    assert Image.MAX_IMAGE_PIXELS == 12_345


def test_concurrent_calls_restore_pillows_limit(files, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_321)
    paths = [files[name].path for name in ("astronaut", "animated", "huge", "truncated")] * 8
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_prepare, paths))
    assert [result.error is None for result in results[:4]] == [True, True, False, False]
    assert Image.MAX_IMAGE_PIXELS == 4_321


@pytest.mark.parametrize("name", GOOD + MODES)
def test_every_mode_becomes_384_rgb(files, name: str) -> None:
    item = files[name]
    with Image.open(item.path) as source:  # the corpus really holds the mode under test
        assert source.mode == EXPECTED_MODES.get(name, "RGB")
    prepared = _prepare(item.path)
    assert prepared.error is None
    assert prepared.pixels is not None and len(prepared.pixels) == SIZE * SIZE * 3
    assert (prepared.width, prepared.height) == item.size
    image = pixels_to_image(prepared.pixels)
    assert (image.mode, image.size) == ("RGB", (SIZE, SIZE))
    assert _array(prepared.pixels).std() > 0 or name == "animated"  # not a blank canvas


def test_transparency_is_flattened_on_white(files) -> None:
    rgba = _array(_prepare(files["rgba"].path).pixels)  # left half transparent
    assert (rgba[SIZE // 2, 4] == 255).all()
    assert not (rgba[SIZE // 2, SIZE - 40] == 255).all()

    la = _array(_prepare(files["la"].path).pixels)  # top half transparent
    assert (la[4, SIZE // 2] == 255).all()
    assert (la[:, :, 0] == la[:, :, 1]).all() and (la[:, :, 1] == la[:, :, 2]).all()  # still grey

    palette = _array(_prepare(files["palette_transparent"].path).pixels)  # left: transparent red, right: blue
    assert (palette[SIZE // 2, 4] == 255).all(), "a transparent palette entry must show white, not its colour"
    assert np.abs(palette[SIZE // 2, SIZE - 4].astype(int) - (0, 0, 255)).max() <= 2


def test_exif_orientation_is_applied(files) -> None:
    item = files["rotated"]  # stored 451 x 300 with orientation 6 (displayed 300 x 451)
    prepared = _prepare(item.path)
    assert (prepared.width, prepared.height) == (300, 451)
    upright = Image.fromarray(skimage.data.chelsea()).transpose(Image.Transpose.ROTATE_270)
    expected = _array(prepare_image(_jpeg(upright), "upright.jpg").pixels).astype(int)
    sideways = _array(prepare_image(_jpeg(Image.fromarray(skimage.data.chelsea())), "plain.jpg").pixels)
    got = _array(prepared.pixels).astype(int)
    assert np.abs(got - expected).mean() < 3
    assert np.abs(got - sideways.astype(int)).mean() > 3 * np.abs(got - expected).mean()


def test_animated_gif_uses_its_first_frame(files) -> None:
    pixels = _array(_prepare(files["animated"].path).pixels)  # frames: red, green, blue
    assert np.abs(pixels.reshape(-1, 3).astype(int) - (255, 0, 0)).max() <= 2


def test_sixteen_bit_uses_the_full_range(files) -> None:
    pixels = _array(_prepare(files["gray16"].path).pixels)  # a 0..65535 ramp
    assert pixels.min() <= 2 and pixels.max() >= 253
    assert (np.diff(pixels[SIZE // 2, 8:-8, 0].astype(int)) >= 0).all()  # still a ramp


def test_cmyk_looks_like_the_rgb_photograph(files) -> None:
    cmyk = _array(_prepare(files["cmyk"].path).pixels).astype(int)
    rgb = _array(_prepare(files["coffee"].path).pixels).astype(int)
    assert np.abs(cmyk - rgb).mean() < 8  # not inverted, not channel-swapped


def test_draft_decode_matches_full_decode() -> None:
    photo = Image.fromarray(skimage.data.astronaut()).resize((2048, 1536), Image.Resampling.BICUBIC)
    data = _jpeg(photo)
    draft = prepare_image(data, "big.jpg", draft=True)
    full = prepare_image(data, "big.jpg", draft=False)
    assert draft.error is None and full.error is None
    assert (draft.width, draft.height) == (full.width, full.height) == (2048, 1536)
    assert len(draft.pixels or b"") == len(full.pixels or b"") == SIZE * SIZE * 3
    difference = np.abs(_array(draft.pixels).astype(int) - _array(full.pixels).astype(int))
    assert difference.mean() < 2.0, difference.mean()


def test_draft_is_only_a_decoding_shortcut(files) -> None:
    # Small JPEGs and other formats give the same bytes either way.
    for name in ("chelsea", "rgba", "rotated"):
        path = files[name].path
        assert _prepare(path, draft=True).pixels == _prepare(path, draft=False).pixels
