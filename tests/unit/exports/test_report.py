"""The run report: statistics streamed from committed rows, bounded, escaped, every chart present, thumbnails
of the worst examples (files and tar members), the CLI, and the page in a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.exports import report as report_module
from pipeline.exports.report import build_report, collect, thumbnails, write_report, write_run_report
from pipeline.exports.table import open_output
from pipeline.table.ledger import Ledger
from pipeline.table.names import part_path
from pipeline.table.records import Marker
from tests.unit.exports.fake_output import (
    COLORS,
    XSS,
    FakeOutput,
    _marker,
    _row,
    _write_parquet,
    build_output,
    build_real_output,
    jpeg,
    write_tar,
)

CHARTS = ["words-tags", "words-description", "confidence-tags", "confidence-description", "glitches", "errors",
          "throughput-shards", "throughput-images", "tags-tags"]
FIGURE = re.compile(r'<figure class="chart" data-chart="([^"]+)"><figcaption>([^<]+)</figcaption>'
                    r'<svg [^>]*><title>([^<]+)</title>(.*?)</svg></figure>', re.S)


def add_scored_shard(fake: FakeOutput, confidences: dict[str, float | None], glitched: str | None = None) -> None:
    """Commit shard 000004: rows of existing images with `tags_confidence` (and one glitched row)."""
    base = str(fake.input)
    rows = []
    for key, confidence in confidences.items():
        row = _row(f"scored/{key}", f"{base}/{key}", "000004", glitch="truncated" if key == glitched else None)
        row["tags_confidence"] = confidence
        rows.append(row)
    _write_parquet(part_path(str(fake.output), "000004"), rows)
    Ledger(str(fake.output)).write_marker(Marker.of("000004", _marker(rows, time.time() - 10)))


def test_statistics_are_streamed_from_committed_rows(fake_output: FakeOutput) -> None:
    data = collect(open_output(str(fake_output.output)))
    ok = [row for row in fake_output.rows.values() if row["status"] == "ok"]
    assert data.rows == len(fake_output.rows)
    assert data.errors == {"cannot identify image file <broken.jpg>": 1}
    tags, description = data.modes["tags"], data.modes["description"]
    assert (tags.is_tags, description.is_tags) == (True, False)
    assert tags.captions == description.captions == len(ok)
    assert sum(tags.words.values()) == len(ok) and tags.words[3] == 1  # "red, square\r\n\nbright"
    assert tags.glitches == {"repetition": 1} and not description.glitches
    assert tags.tags["red"] == 1 and tags.tags["square bright"] == 1
    assert tags.has_confidence and tags.scored == 0  # the column is there, every value null
    assert [row["key"] for row in data.worst_rows()] == ["cat/a.jpg"]  # the one glitched caption


def test_worst_examples_glitched_first_then_lowest_confidence_and_bounded(fake_output: FakeOutput,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "WORST", 3)
    add_scored_shard(fake_output, {"cat/a.png": 0.9, "dog/b.png": 0.12, "cat/a.jpg": 0.5, "with space/é ü.jpg": 0.05,
                                   "日本/画像.jpg": None}, glitched="cat/a.png")
    data = collect(open_output(str(fake_output.output)))
    # Glitched first (a scored glitch before an unscored one), then the lowest confidence.
    assert [row["key"] for row in data.worst_rows()] == ["scored/cat/a.png", "cat/a.jpg", "scored/with space/é ü.jpg"]
    assert len(data.worst) <= 4 * 3
    assert data.modes["tags"].scored == 4 and data.modes["tags"].confidence[1] == 1  # 0.05..0.10: 0.05
    assert data.modes["tags"].confidence[18] == 1  # 0.9
    assert data.modes["tags"].glitches == {"repetition": 1, "truncated": 1}


def test_tag_counts_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "TAG_LIMIT", 10)
    mode = report_module.ModeData("tags", True)
    for index in range(200):
        mode.add_tags(f"common, Common , rare{index}")
    assert len(mode.tags) <= 20 and mode.tags.most_common(1) == [("common", 400)]


def test_an_output_without_confidence_gets_a_note(fake_output: FakeOutput) -> None:
    for shard in ("000000", "000001"):  # as an older run wrote them: no <mode>_confidence columns
        path = part_path(str(fake_output.output), shard)
        table = pq.read_table(path)
        pq.write_table(table.drop_columns([name for name in table.column_names if name.endswith("_confidence")]),
                       path)
    page, data = build_report(str(fake_output.output))
    assert not data.modes["tags"].has_confidence
    assert 'data-note="confidence-tags"' in page and 'data-chart="confidence-tags"' not in page
    assert "no tags_confidence column" in page


def test_page_holds_every_chart_escaped_with_thumbnails(fake_output: FakeOutput) -> None:
    add_scored_shard(fake_output, {"dog/b.png": 0.2})
    page, _data = build_report(str(fake_output.output))
    figures = {match[0]: match for match in FIGURE.findall(page)}
    assert sorted(figures) == sorted(CHARTS)
    for chart_id, caption, title, body in figures.values():
        assert caption == title and title.strip(), chart_id
        assert "<rect" in body or "no data" in body, chart_id
    assert "<rect" in figures["words-tags"][3] and "<rect" in figures["errors"][3]
    assert "<rect" in figures["confidence-tags"][3] and "no data" in figures["confidence-description"][3]
    assert page.count('<article class="example"') == 2  # the glitched row and the scored one
    assert page.count('src="data:image/jpeg;base64,') == 2
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert XSS not in page  # the glitched row's description is not shown; its tags are, escaped
    assert "uncommitted/zzz.jpg" not in page and "staged/yyy.jpg" not in page


def test_tar_members_get_thumbnails_through_their_shard(tmp_path: Path) -> None:
    write_tar(tmp_path / "in" / "00000.tar", [("a.jpg", jpeg((255, 0, 0))), ("a.txt", b"alt a"),
                                               ("b.png", jpeg((0, 0, 255), image_format="PNG"))])
    real = build_real_output(tmp_path / "out", str(tmp_path / "in"), "webdataset")
    output = open_output(str(real.output))
    rows = [row for row in real.rows.values() if row["status"] == "ok"]
    found = thumbnails(output, rows, None)
    assert sorted(found) == sorted(row["key"] for row in rows) and all(uri for uri, _why in found.values())


def test_write_report_default_target_and_refusals(fake_output: FakeOutput) -> None:
    written = write_report(str(fake_output.output))
    assert written.endswith("out/report.html") and (fake_output.output / "report.html").stat().st_size > 1000
    write_report(str(fake_output.output))  # the output's own page is replaced
    other = fake_output.root / "mine.html"
    other.write_text("notes")
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        write_report(str(fake_output.output), str(other))
    assert other.read_text() == "notes"
    assert write_report(str(fake_output.output), str(other), overwrite=True) == str(other)
    mine = fake_output.output / "report.html"  # a user's own file in an --allow-existing output is kept
    mine.write_text("my report")
    with pytest.raises(ValueError, match="is not a pipeline report; it was kept"):
        write_report(str(fake_output.output))
    assert mine.read_text() == "my report"
    assert write_run_report(str(fake_output.output)).startswith("warning: the run report was not written")
    line = write_run_report(str(fake_output.root / "nothing-here"))
    assert line.startswith("warning: the run report was not written: FileNotFoundError")


def test_cli_report(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(fake_output.output)]) == 0
    assert capsys.readouterr().out == f"report: {fake_output.output}/report.html\n"
    page = fake_output.root / "r.html"
    assert main(["report", str(fake_output.output), "--to", str(page)]) == 0
    assert main(["report", str(fake_output.output), "--to", str(page)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["report", str(fake_output.root / "none")]) == 2


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)


def check_report_in_chromium(page: Path, charts: list[str], profile: Path) -> str:
    """Every chart's SVG and title present and non-empty in the DOM the browser built, and a screenshot that
    is not blank; returns the DOM."""
    dom = _chromium("--dump-dom", page.as_uri(), profile=profile / "dom").stdout
    figures = {match[0]: match for match in FIGURE.findall(dom)}
    assert sorted(figures) == sorted(charts), sorted(figures)
    for chart_id, caption, title, body in figures.values():
        assert caption.strip() and title.strip() and ("<rect" in body or "no data" in body), chart_id
    shot = profile / "page.png"
    _chromium(f"--screenshot={shot}", "--window-size=1200,3000", page.as_uri(), profile=profile / "shot")
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 20, "the screenshot is (nearly) blank"
    bars = sum(count for count, rgb in colours if rgb == (0x3B, 0x78, 0xC2))
    assert bars > 500, "no chart bars on screen"
    return dom


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    fake = build_output(tmp_path, hostile=False)
    add_scored_shard(fake, {"dog/b.png": 0.2, "cat/a.png": 0.7})
    page = Path(write_report(str(fake.output)))
    dom = check_report_in_chromium(page, CHARTS, tmp_path / "chromium")
    assert dom.count('<article class="example"') == 3 and "&lt;script&gt;" not in dom.split("<h2>Worst")[0]
    assert set(COLORS) >= {"dog/b.png", "cat/a.png"}
