"""The review gallery: a deterministic sample, embedded thumbnails, escaped text, and a page a real
browser renders (headless Chromium: DOM dump and screenshot)."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.exports.gallery import sample_rows, thumbnail, write_gallery
from pipeline.exports.table import open_output
from tests.unit.exports.fake_output import COLORS, XSS, FakeOutput, build_output

DATA_URI = re.compile(r'<img class="thumb" src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')


def test_sample_is_deterministic_and_bounded(fake_output: FakeOutput) -> None:
    output = open_output(str(fake_output.output))
    first, total = sample_rows(output, 5, seed=0)
    again, _ = sample_rows(output, 5, seed=0)
    other, _ = sample_rows(output, 5, seed=1)
    keys = [row["key"] for row in first]
    assert total == len(fake_output.rows) and len(first) == 5
    assert keys == sorted(keys) == [row["key"] for row in again]
    assert keys != [row["key"] for row in other]
    everything, _ = sample_rows(output, 1000, seed=3)
    assert sorted(row["key"] for row in everything) == sorted(fake_output.rows)


def test_thumbnail_is_a_small_jpeg_or_a_reason(fake_output: FakeOutput) -> None:
    big = fake_output.root / "big.png"
    Image.new("RGBA", (1000, 400), (10, 200, 30, 255)).save(big)
    uri, why = thumbnail({"source": str(big), "member": None}, {})
    assert uri is not None and why == ""
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert (image.format, image.size) == ("JPEG", (256, 102))
    assert thumbnail({"source": "/x/shard.tar", "member": "a.jpg"}, {})[1].startswith("image is inside an archive")
    assert thumbnail({"source": str(fake_output.input / "broken.jpg"), "member": None}, {})[0] is None
    assert thumbnail({"source": str(fake_output.root / "missing.jpg"), "member": None}, {})[0] is None


def test_page_content_is_escaped_and_complete(fake_output: FakeOutput) -> None:
    page_path = fake_output.root / "review" / "page.html"
    assert write_gallery(str(fake_output.output), str(page_path), sample=100, seed=0) == len(fake_output.rows)
    page = page_path.read_text("utf-8")
    assert page.count('<article class="card"') == len(fake_output.rows)
    assert len(DATA_URI.findall(page)) == len(COLORS)  # every real image file, nothing else
    assert page.count('class="thumb placeholder"') == len(fake_output.rows) - len(COLORS)
    assert XSS not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "<script" not in page and "\x00" not in page and "nul\ufffdbyte.jpg" in page
    assert page.count('class="caption" data-mode="tags"') == page.count('class="caption" data-mode="description"')
    assert '<span class="glitch" data-glitch="repetition">' in page
    assert '<p class="error">cannot identify image file &lt;broken.jpg&gt;</p>' in page
    assert "日本/画像.jpg" in page and "with space/é ü.jpg" in page
    assert "uncommitted/zzz.jpg" not in page and "staged/yyy.jpg" not in page
    assert write_gallery(str(fake_output.output), str(page_path), sample=100, seed=0, overwrite=True) and \
        page_path.read_text("utf-8") == page  # same seed, same bytes


def test_cli_gallery(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    page = fake_output.root / "g.html"
    assert main(["gallery", str(fake_output.output), "--to", str(page), "--sample", "3", "--seed", "2"]) == 0
    assert "3 rows" in capsys.readouterr().out
    assert page.read_text("utf-8").count('<article class="card"') == 3
    assert main(["gallery", str(fake_output.output), "--to", str(page), "--sample", "0"]) == 2


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def _pixels_near(image: Image.Image, color: tuple[int, int, int], tolerance: int = 40) -> int:
    bands = [band.point(lambda v, c=c: 255 if abs(v - c) <= tolerance else 0) for band, c in zip(image.split(), color,
                                                                                                 strict=True)]
    mask = Image.merge("RGB", bands).convert("L").point(lambda v: 255 if v == 255 else 0)
    return mask.histogram()[255]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    fake = build_output(tmp_path, hostile=False)
    page = tmp_path / "page.html"
    write_gallery(str(fake.output), str(page), sample=48, seed=0)
    dom = _chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile-dom").stdout
    assert dom.count('<article class="card"') == len(fake.rows) == 7
    assert len(DATA_URI.findall(dom)) == len(COLORS)
    assert dom.count('class="caption" data-mode="tags"') == 6  # ok rows; the error row has none
    assert "tags of dog/b.png\nsecond line" in dom and "description of 日本/画像.jpg" in dom
    assert "<script>" not in dom and "&lt;script&gt;" in dom  # escaped text, not an element
    assert 'class="error"' in dom and 'class="glitch"' in dom and "not re-read for the gallery" in dom

    shot = tmp_path / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri(), profile=tmp_path / "profile-shot")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    # Each thumbnail is a solid 64 x 48 colour: if the data URIs decoded, the colours are on screen.
    for key, color in COLORS.items():
        assert _pixels_near(image, color) >= 0.8 * 64 * 48, f"{key} thumbnail not visible"


def test_cli_gallery_replaces_a_page_only_with_overwrite(fake_output: FakeOutput,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    page = fake_output.root / "g.html"
    page.write_text("my notes")
    command = ["gallery", str(fake_output.output), "--to", str(page), "--sample", "2"]
    assert main(command) == 2
    assert capsys.readouterr().err == f"error: {page} exists; pass --overwrite to replace it\n"
    assert page.read_text() == "my notes"
    assert main([*command, "--overwrite"]) == 0
    assert page.read_text("utf-8").count('<article class="card"') == 2
    assert main(["gallery", str(fake_output.output), "--to", str(fake_output.root)]) == 2
    assert f"--to {fake_output.root} is a folder; gallery writes one file" in capsys.readouterr().err
