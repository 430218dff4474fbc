"""The note exports and galleries of an unfinished output print: one stderr line, exit 0 still."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cli.main import main
from pipeline.exports.pending import describe_pending
from pipeline.table.ledger import Ledger
from pipeline.table.records import StatusReport
from tests.unit.exports.fake_output import FakeOutput, build_real_output, jpeg, write_tar


def _report(**changes: Any) -> StatusReport:
    report = {"plan_complete": True, "shards_planned": 10, "shards_committed": 10, "shards_pending": 0,
              "images_known": 1000, "images_done": 1000}
    return StatusReport(output="/out", **{**report, **changes})


def test_describe_pending() -> None:
    assert describe_pending(_report()) is None
    assert describe_pending(_report(shards_committed=8, shards_pending=2, images_done=880)) == (
        "note: the output is not finished: 120 of 1,000 planned images are not committed yet; this export holds "
        "the 880 committed")
    # Tar shards are counted only once read: the plan knows no image count, so shards are counted.
    assert describe_pending(_report(shards_pending=3, images_known=0, images_done=70), "this gallery samples") == (
        "note: the output is not finished: 3 of 10 planned shards are not committed yet; this gallery samples the "
        "70 images committed")
    assert describe_pending(_report(plan_complete=False, shards_committed=2, images_done=5000)) == (
        "note: the output is not finished: its run is still planning (2 shards committed so far); this export "
        "holds the 5,000 images committed")


def _unfinished(fake: FakeOutput) -> str:
    """Make the fake output's plan promise 1,000 images in 4 shards (2 committed)."""
    Ledger(str(fake.output)).write_plan([], grown_from={"shards": 4, "images_known": 1000})
    done = len(fake.rows)
    return (f"note: the output is not finished: {1000 - done:,} of 1,000 planned images are not committed yet; "
            f"this export holds the {done} committed\n")


@pytest.mark.parametrize("export", [["--format", "jsonl", "--to", "{root}/rows.jsonl"],
                                    ["--format", "txt", "--to", "{root}/txt"],
                                    ["--format", "imagefolder", "--to", "{root}/hf"]])
def test_export_of_an_unfinished_output_says_so(fake_output: FakeOutput, export: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    note = _unfinished(fake_output)
    arguments = [part.format(root=fake_output.root) for part in export]
    assert main(["export", str(fake_output.output), *arguments]) == 0
    printed = capsys.readouterr()
    assert printed.err == note and "written" in printed.out


def test_gallery_of_an_unfinished_output_says_so(fake_output: FakeOutput, capsys: pytest.CaptureFixture[str]) -> None:
    note = _unfinished(fake_output).replace("this export holds", "this gallery samples")
    assert main(["gallery", str(fake_output.output), "--to", str(fake_output.root / "g.html")]) == 0
    assert capsys.readouterr().err == note


def test_unfinished_webdataset_output_counts_shards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for index in range(3):
        write_tar(tmp_path / "wds" / f"{index:06d}.tar", [(f"s{n}.jpg", jpeg((n, 0, 0))) for n in range(index + 1)])
    real = build_real_output(tmp_path / "out", str(tmp_path / "wds"), "webdataset", commit=1)
    assert main(["export", str(real.output), "--format", "imagefolder", "--to", str(tmp_path / "hf")]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("1 written")
    assert printed.err == ("note: the output is not finished: 2 of 3 planned shards are not committed yet; this "
                           "export holds the 1 image committed\n")
