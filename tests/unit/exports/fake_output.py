"""A real output folder on disk, written the way a run writes it, for the export and gallery tests.

Shards 000000 and 000001 are committed (part file + marker); 000002 has a part file but no marker
(a commit cut short: must never be exported); 000003 only has staging fragments. Keys include
hostile ones (`..`, absolute, backslashes, NUL), spaces and non-ASCII, and images are real JPEG
and PNG files in an input folder, so thumbnails and --beside-images have something to find.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from pipeline.io.fs import open_fs, write_atomic
from pipeline.ledger import Ledger
from pipeline.records import Marker
from pipeline.sink import output_schema, part_path, staging_dir, to_table

MODES = ["tags", "description"]
COLORS = {"cat/a.jpg": (255, 0, 0), "cat/a.png": (255, 0, 255), "dog/b.png": (0, 255, 0),
          "with space/é ü.jpg": (0, 0, 255), "日本/画像.jpg": (255, 255, 0)}
# Relative escapes climb at most three levels, and the absolute key points into tmp_path (ABSOLUTE), so
# a regression writes where the tests look rather than anywhere on the machine.
ABSOLUTE = "{root}/abs/evil.jpg"
HOSTILE_KEYS = ["../escape.jpg", "../../../deep.jpg", ABSOLUTE, "a/../../up.jpg", "back\\..\\..\\slash.jpg",
                "nul\x00byte.jpg", "..", "/", "./x/./y.jpg", "a//b.jpg"]
XSS = '<script>alert("x")</script> & <b>bold</b>'


@dataclass
class FakeOutput:
    root: Path  # tmp_path: everything the test may write lives below it
    input: Path
    output: Path
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # committed rows by key


def _row(key: str, source: str | None, shard: str, *, status: str = "ok", member: str | None = None,
         error: str | None = None, captions: dict[str, str | None] | None = None,
         glitch: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"key": key, "source": source, "member": member, "shard": shard, "status": status,
                           "error": error, "width": 64 if status == "ok" else None,
                           "height": 48 if status == "ok" else None, "format": "JPEG" if status == "ok" else None}
    for mode in MODES:
        text = (captions or {}).get(mode, f"{mode} of {key}\nsecond line") if status == "ok" else None
        row.update({mode: text, f"{mode}_prompt": f"Write the {mode} of <this> image." if text else None,
                    f"{mode}_tokens": 12 if text else None, f"{mode}_finish_reason": "stop" if text else None,
                    f"{mode}_glitch": glitch if text and mode == "tags" else None,
                    f"{mode}_attempts": (2 if glitch else 1) if text else None, f"{mode}_seed": 7 if text else None})
    return row


def _write_parquet(path: str, rows: list[dict[str, Any]]) -> None:
    schema = output_schema(MODES)
    table = to_table({name: [row.get(name) for row in rows] for name in schema.names}, schema).sort_by("key")
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    fs, local_path = open_fs(path)
    write_atomic(fs, local_path, buffer.getvalue())


def _marker(rows: list[dict[str, Any]], committed_at: float) -> dict[str, Any]:
    ok = [row for row in rows if row["status"] == "ok"]
    modes = {mode: {"captions": sum(1 for row in ok if row[mode]),
                    "tokens": sum(row[f"{mode}_tokens"] or 0 for row in ok),
                    "glitched": sum(1 for row in ok if row[f"{mode}_glitch"]),
                    "retries": sum((row[f"{mode}_attempts"] or 1) - 1 for row in ok)} for mode in MODES}
    return {"rows": len(rows), "ok": len(ok), "errors": len(rows) - len(ok), "modes": modes,
            "fingerprint": "fp-test", "committed_at": committed_at}


def hostile_keys(root: Path) -> list[str]:
    return [key.format(root=root) if key == ABSOLUTE else key for key in HOSTILE_KEYS]


def build_output(root: Path, hostile: bool = True) -> FakeOutput:
    """Write input images, then an output folder holding two committed shards and two unfinished.
    Without `hostile`, shard 000001 holds only its tar row (a small page for the browser test)."""
    fake = FakeOutput(root, root / "data" / "in" / "input", root / "runs" / "out")
    for key, color in COLORS.items():
        path = fake.input / key
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), color).save(path)
    (fake.input / "broken.jpg").write_bytes(b"not an image")
    base = str(fake.input)
    shard0 = [_row(key, f"{base}/{key}", "000000") for key in COLORS]
    shard0[0] = _row("cat/a.jpg", f"{base}/cat/a.jpg", "000000", glitch="repetition",
                     captions={"tags": "red, square\r\n\nbright", "description": XSS})
    shard0.append(_row("broken.jpg", f"{base}/broken.jpg", "000000", status="error",
                       error="cannot identify image file <broken.jpg>"))
    shard1 = [_row(key, os.path.join(base, key), "000001") for key in (hostile_keys(root) if hostile else [])]
    shard1.append(_row("shard/000001", f"{base}/data.tar", "000001", member="000001.jpg"))
    ledger = Ledger(str(fake.output))
    now = time.time()
    ledger.write_manifest({"fingerprint": "fp-test", "created_at": now - 100, "pipeline_version": "0.1.0",
                           "model": {"path": "tiny-model"}, "seed": 0,
                           "modes": [{"name": mode, "max_tokens": 64} for mode in MODES],
                           "config": {"input": {"uri": base, "format": "folder"}, "output": {"uri": str(fake.output)}}})
    ledger.write_plan([])  # the plan summary; the test shards need no plan files
    for shard, rows, at in (("000000", shard0, now - 60), ("000001", shard1, now - 30)):
        _write_parquet(part_path(str(fake.output), shard), rows)
        ledger.write_marker(Marker.of(shard, _marker(rows, at)))
        fake.rows.update({row["key"]: row for row in rows})
    _write_parquet(part_path(str(fake.output), "000002"), [_row("uncommitted/zzz.jpg", f"{base}/cat/a.jpg", "000002")])
    _write_parquet(staging_dir(str(fake.output), "000003") + "/fragment.parquet",
                   [_row("staged/yyy.jpg", f"{base}/cat/a.jpg", "000003")])
    return fake


def snapshot(root: Path) -> set[Path]:
    """Every file under `root` (symlinks not followed), to see what an export added."""
    return {Path(directory) / name for directory, _dirs, names in os.walk(root) for name in names}
