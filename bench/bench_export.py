"""Memory and speed of the trainer exports: consolidated Parquet (with images) and WebDataset tars.

    python bench/bench_export.py [--rows 100000] [--small 10000] [--layout folder,tar] [--target-size 16MB]
                                 [--json OUT] [--workdir DIR]

Builds outputs the way the export tests do (tests/unit/exports/fake_output.py: the pipeline's own planner
and readers over a real input, captions made up, no engine): an input of `--small` and one of `--rows` tiny
distinct JPEGs (32 x 32 pixels of noise, about 1.5 kB; 1,000 distinct images cycled), as image files in
folders of 1,000 (`folder`) or as WebDataset tars of 1,000 samples (`tar`), committed in shards of 256.
Then each export runs in a fresh child process. It first exports a 300-row output of the same layout,
unmeasured: the first Parquet write and read of a process alone adds about 55 MiB (Arrow's and Parquet's code
pages, thread pools, allocator arenas), the same at any row count. Then it reports its peak resident memory
above what it held just before the measured export (VmRSS before, VmHWM after, from /proc/self/status: Linux)
and its rows per second, per wall-clock second and per CPU-second of the process (all its threads; steadier on
a busy machine).

Streamed exports hold at most one row group (Parquet) or one sample (tars) plus a bounded read-ahead, so the
growth should not depend on the number of rows: the ratio of the growth at `--rows` to that at `--small`
is about 1.0 when memory is flat. Two file sizes are measured by default: 16MB, where Parquet row groups (a
sixteenth of it) fill many times over even at `--small` rows, so the ratio shows the bound and not a buffer
still filling; and each format's default (256MB: row groups of 16 MB, which tiny images fill only after about
15,000 rows; 1GB: every tar holds all the rows here, the case where a writer that remembered each member grew).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

DISTINCT = 1000
PER_CONTAINER = 1000
SHARD_SIZE = 256
WARM_UP = 300  # rows of the export each child runs first, unmeasured


def tiny_jpegs(count: int = DISTINCT, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = random.Random(seed)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.frombytes("RGB", (32, 32), rng.randbytes(32 * 32 * 3)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def write_input(root: Path, layout: str, rows: int, images: list[bytes]) -> str:
    """An input of `rows` images: files in folders of 1,000, or tars of 1,000 samples."""
    if layout == "folder":
        for index in range(rows):
            path = root / f"{index // PER_CONTAINER:04d}" / f"{index:07d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(images[index % len(images)])
        return str(root)
    from tests.unit.exports.fake_output import write_tar

    for start in range(0, rows, PER_CONTAINER):
        members = [(f"{index:07d}.jpg", images[index % len(images)]) for index in range(start, min(rows, start +
                                                                                                   PER_CONTAINER))]
        write_tar(root / f"{start // PER_CONTAINER:06d}.tar", members)
    return str(root)


def build(workdir: Path, layout: str, rows: int, images: list[bytes]) -> str:
    """An output of `rows` committed rows over a fresh input; returns its folder."""
    from tests.unit.exports.fake_output import build_real_output

    base = workdir / f"{layout}-{rows}"
    input_uri = write_input(base / "in", layout, rows, images)
    started = time.perf_counter()
    real = build_real_output(base / "out", input_uri, "folder" if layout == "folder" else "webdataset",
                             shard_size=SHARD_SIZE)
    assert len(real.images) == rows, (len(real.images), rows)
    print(f"  built {layout} output of {rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
    return str(real.output)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one export in this (fresh) process; its peak memory growth and speed."""
    import logging

    from pipeline.exports.consolidated import DEFAULT_TARGET_SIZE as PARQUET_DEFAULT
    from pipeline.exports.consolidated import export_parquet
    from pipeline.exports.webdataset import DEFAULT_TARGET_SIZE as WEBDATASET_DEFAULT
    from pipeline.exports.webdataset import export_webdataset

    def export(output: str, to: str) -> Any:
        if spec["format"] == "parquet":
            return export_parquet(output, to, with_images=True, target_size=spec["target_size"] or PARQUET_DEFAULT)
        return export_webdataset(output, to, target_size=spec["target_size"] or WEBDATASET_DEFAULT)

    logging.disable(logging.WARNING)
    export(spec["warm_up"], spec["to"] + "-warm-up")  # code pages, Arrow's thread pools, allocator arenas
    shutil.rmtree(spec["to"] + "-warm-up")
    reset_peak()
    before = status_kib("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    counts = export(spec["output"], spec["to"])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    peak = status_kib("VmHWM")
    size = sum(entry.stat().st_size for entry in os.scandir(spec["to"]) if entry.is_file())
    return {"rows": counts.written, "files": counts.files, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "rows_per_s": counts.written / seconds, "rows_per_cpu_s": counts.written / cpu_seconds,
            "growth_mib": max(0, peak - before) / 1024, "bytes": size}


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (VmHWM: the peak resident set of this
    process image; getrusage's ru_maxrss would carry the parent's peak across fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Start VmHWM again from the current resident set (Linux 4.0 and later), so import peaks do not count."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        pass  # then the peak counts from the process start: a growth figure no smaller than the true one


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"export child failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--layout", default="folder,tar", help="input layouts to measure: folder, tar")
    parser.add_argument("--target-size", default="16MB,default",
                        help="file sizes to measure, comma-separated; `default`: each format's own (256MB, 1GB)")
    parser.add_argument("--workdir", help="where inputs, outputs and exports go (default: a temporary folder, removed)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-export-"))
    images = tiny_jpegs()
    results: list[dict[str, Any]] = []
    try:
        for layout in [name.strip() for name in args.layout.split(",") if name.strip()]:
            warm_up = build(workdir, layout, WARM_UP, images)
            outputs = {rows: build(workdir, layout, rows, images) for rows in (args.small, args.rows)}
            for size, fmt in [(size, fmt) for size in args.target_size.split(",") for fmt in ("parquet", "webdataset")]:
                figures = {}
                for rows, output in outputs.items():
                    to = workdir / f"export-{layout}-{fmt}-{rows}"
                    figures[rows] = measure({"format": fmt, "output": output, "to": str(to), "warm_up": warm_up,
                                             "target_size": "" if size == "default" else size})
                    shutil.rmtree(to)
                small, large = figures[args.small], figures[args.rows]
                ratio = large["growth_mib"] / small["growth_mib"] if small["growth_mib"] else float("nan")
                results.append({"layout": layout, "format": fmt, "target_size": size, "small": small, "large": large,
                                "ratio": ratio})
                print(f"{layout:6} {fmt:10} {size:8} peak RSS growth {small['growth_mib']:6.1f} MiB at "
                      f"{args.small:,} rows, "
                      f"{large['growth_mib']:6.1f} MiB at {args.rows:,} rows: ratio {ratio:.2f}; "
                      f"{large['rows_per_s']:,.0f} rows/s ({large['rows_per_cpu_s']:,.0f} per CPU-second; "
                      f"{large['files']} files, {large['bytes'] / 1e6:.0f} MB)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"{time.strftime('%Y-%m-%d')}, {machine}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine,
                                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
