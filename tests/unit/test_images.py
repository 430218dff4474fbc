"""pipeline.images.prepare_image: every mode becomes JoyCaption's 384 x 384 RGB input, failures are reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline.images import SIZE, pixels_to_image, prepare_image

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


def test_images_past_pillows_own_limit_are_over_the_pixel_limit(files, monkeypatch) -> None:
    # Pillow refuses images over 2 x MAX_IMAGE_PIXELS while opening them; that is a size problem too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    prepared = _prepare(files["astronaut"].path)
    assert prepared.error is not None and prepared.error.startswith("over the pixel limit"), prepared.error


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
