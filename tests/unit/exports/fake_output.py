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
from pipeline.table.ledger import Ledger
from pipeline.table.names import part_path, staging_dir
from pipeline.table.records import Marker
from pipeline.table.schema import output_schema, to_table

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


# ------------------------------------------------------------------------- outputs of real inputs, read for real
@dataclass
class RealOutput:
    """An output whose rows the pipeline's own planner and readers made from a real input (no engine)."""

    output: Path
    input_uri: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # every committed row by key
    images: dict[str, bytes] = field(default_factory=dict)  # ok rows: the bytes the reader gave


def _decoded(data: bytes | None) -> tuple[str | None, int | None, int | None]:
    """(PIL format, width, height) of image bytes, or (None, None, None) when they are no image."""
    if data is None:
        return None, None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.format, image.width, image.height
    except (OSError, ValueError, SyntaxError):
        return None, None, None


def _rows_of_shard(shard: Any, config: Any, real: RealOutput) -> list[dict[str, Any]]:
    from pipeline.io.sources import read_shard

    rows = []
    for record in read_shard(shard, config)[1]:
        image_format, width, height = _decoded(record.data)
        if image_format is None:
            rows.append(_row(record.key, record.source, shard.id, status="error", member=record.member,
                             error=record.error or "cannot identify image file"))
            continue
        row = _row(record.key, record.source, shard.id, member=record.member)
        rows.append({**row, "format": image_format, "width": width, "height": height})
        real.images[record.key] = record.data or b""
    return rows


def build_real_output(output: Path, input_uri: str, input_format: str = "auto", shard_size: int = 4,
                      commit: int | None = None) -> RealOutput:
    """Plan `input_uri` and read it with the pipeline's own code, then write the manifest, plan files, part
    files and markers a run would (captions from the key, as `_row` makes them). Only the first `commit`
    shards are committed when given (an unfinished run)."""
    from pipeline.config import InputConfig
    from pipeline.io.sources import plan_shards

    config = InputConfig(uri=input_uri, format=input_format, shard_size=shard_size)
    shards = list(plan_shards(config))
    real = RealOutput(output, input_uri)
    ledger = Ledger(str(output))
    ledger.write_manifest({"fingerprint": "fp-test", "created_at": time.time() - 100, "model": {"path": "tiny"},
                           "modes": [{"name": mode, "max_tokens": 64} for mode in MODES],
                           "config": {"input": config.model_dump(mode="json", exclude={"storage_options"}),
                                      "output": {"uri": str(output)}}})
    ledger.write_plan(shards)
    for shard in shards[:commit]:
        rows = _rows_of_shard(shard, config, real)
        _write_parquet(part_path(str(output), shard.id), rows)
        ledger.write_marker(Marker.of(shard.id, _marker(rows, time.time())))
        real.rows.update({row["key"]: row for row in rows})
    return real


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (32, 24), image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, image_format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of `(name, data)` members in this order (WebDataset groups consecutive members by key)."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def write_image_parquet(path: Path, images: list[tuple[str | None, bytes | None]], row_group_size: int) -> None:
    """A Parquet file with Hugging Face's `image` struct ({bytes, path}) and a `caption` column."""
    import pyarrow as pa

    path.parent.mkdir(parents=True, exist_ok=True)
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": data, "path": name} for name, data in images], kind),
                      "caption": [f"alt {index}" for index in range(len(images))]})
    pq.write_table(table, path, row_group_size=row_group_size)
