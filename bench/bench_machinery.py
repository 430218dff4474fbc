"""The pipeline's machinery without the engine: can one driver keep up with 64 GPUs?

    python bench/bench_machinery.py [--images 4096] [--shard-size 256] [--json OUT]

Runs the whole pipeline (listing, read and decode tasks, Ray Data, the caption actor pool, fragment
writes, shard commits, markers) with the caption actor replaced by an instant stand-in that fills every
mode with a fixed caption. Once with the output on local disk and once on an S3 server (moto, started
on loopback in its own process), each with three ways to commit: on the driver's loop itself
(`commit_threads: 0`, the baseline measured in the same run), on 4 driver commit threads (the default)
and as 4 Ray tasks (`commit_tasks: 4`). Reports images/s, shard commits/s, commit latency p50/p99
(shard complete on the driver to marker written), and the driver's CPU per 1,000 images: the whole
driver process (Ray Data's executor runs in it too), the same without the commits' own CPU (what the
driver spends when commits run elsewhere), and the pipeline's own loop (bookkeeping and reading write
reports), the commits and Ray Data's executor thread; what is left is the run's start (planning lists the
input, Ray Data builds its plan) and Ray's own threads. The stand-in lives here only; the pipeline takes
it through `execute(captioner=...)`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class InstantCaptioner:
    """Stands in for CaptionActor: same batch in, the same rows with every mode captioned at once."""

    def __init__(self, config_json: str) -> None:
        from pipeline.config import RunConfig
        from pipeline.table.schema import in_flight_schema

        self.modes = [mode.name for mode in RunConfig.model_validate_json(config_json).modes]
        self.schema = in_flight_schema(self.modes)

    def __call__(self, batch: Any) -> Any:
        from pipeline.table.schema import to_table

        columns = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "pixels"}
        ok = [status == "ok" for status in columns["status"]]
        for mode in self.modes:
            columns[mode] = ["a photograph of something" if good else None for good in ok]
            columns[f"{mode}_tokens"] = [5 if good else None for good in ok]
            columns[f"{mode}_attempts"] = [1 if good else None for good in ok]
            columns[f"{mode}_finish_reason"] = ["stop" if good else None for good in ok]
        return to_table(columns, self.schema)


def _images(folder: Path, count: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        path = folder / f"{index // 1000:03d}" / f"{index:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ExecutorCpu:
    """CPU seconds of Ray Data's executor thread (it runs in the driver), sampled from /proc while a run
    goes on: the thread ends with the run, so its figure is the last one seen."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> ExecutorCpu:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(0.2):
            for thread in threading.enumerate():
                if thread.name.startswith("StreamingExecutor") and thread.native_id:
                    with contextlib.suppress(OSError):
                        fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
                        self.seconds = max(self.seconds, (int(fields[11]) + int(fields[12])) / tick)


# (label, compute keys): the first is the baseline
ARMS = (("loop", {"commit_threads": 0}), ("4 threads", {"commit_threads": 4}), ("4 tasks", {"commit_tasks": 4}))


def run_once(input_uri: str, output_uri: str, arm: str, commits: dict[str, int], shard_size: int) -> dict[str, Any]:
    from pipeline.config import build_config
    from pipeline.run.driver import execute

    config = build_config({
        "input": {"uri": input_uri, "shard_size": shard_size}, "output": {"uri": output_uri},
        "model": {"path": "unused-by-the-stand-in"}, "modes": "dual",
        "compute": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 64, **commits}})
    cpu, started = _cpu(), time.perf_counter()
    with ExecutorCpu() as executor:
        summary = execute(config, overwrite=True, allow_existing=True, captioner=InstantCaptioner)
    seconds, cpu = time.perf_counter() - started, _cpu() - cpu
    figures, images = summary.commits, summary.images
    commit_cpu = 0.0 if commits.get("commit_tasks") else figures.commit_cpu_ms_per_1000_images  # tasks: elsewhere
    driver = 1e6 * cpu / images
    return {"arm": arm, "images": images, "shards": summary.shards,
            "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 1),
            "commits_per_s": round(summary.shards / seconds, 2),
            "latency_p50_s": figures.latency_p50_s, "latency_p99_s": figures.latency_p99_s,
            "driver_cpu_ms_per_1000": round(driver, 1),
            "driver_cpu_ms_per_s": round(1e3 * cpu / seconds, 1),
            "executor_cpu_ms_per_1000": round(1e6 * executor.seconds / images, 1),
            "driver_cpu_without_commits_ms_per_1000": round(driver - commit_cpu, 1),
            "commit_cpu_ms_per_1000": figures.commit_cpu_ms_per_1000_images,
            "loop_cpu_ms_per_1000": figures.driver_loop_cpu_ms_per_1000_images}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256, help="the default input.shard_size")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server, endpoint = _moto()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, NO_PROXY="127.0.0.1,localhost")
    import ray
    import s3fs

    results: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            images = Path(scratch) / "images"
            _images(images, args.images)
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
            fs.mkdir("bench")
            fs.put(str(images) + "/", "bench/images/", recursive=True)
            ray.init(include_dashboard=False, log_to_driver=False)  # outside the timed runs
            for where, source, target in (("local", str(images), str(Path(scratch) / "out")),
                                          ("s3", "s3://bench/images", "s3://bench/out")):
                results[where] = [run_once(source, target, arm, commits, args.shard_size) for arm, commits in ARMS]
    finally:
        server.terminate()
    print(f"{args.images} images, shards of {args.shard_size}, dual caption, instant stand-in engine")
    for where, rows in results.items():
        baseline = rows[0]
        for row in rows:
            print(f"{where:>5} commits on {row['arm']:<9} {row['images_per_s']:8.1f} images/s "
                  f"{row['commits_per_s']:6.2f} commits/s  latency p50 {row['latency_p50_s']:.3f} s "
                  f"p99 {row['latency_p99_s']:.3f} s  driver CPU ms/1000 images: {row['driver_cpu_ms_per_1000']:.1f}"
                  f" whole, {row['driver_cpu_without_commits_ms_per_1000']:.1f} without commits, "
                  f"{row['loop_cpu_ms_per_1000']:.1f} own loop, {row['commit_cpu_ms_per_1000']:.1f} commits, "
                  f"{row['executor_cpu_ms_per_1000']:.1f} Ray Data's executor thread; "
                  f"{row['driver_cpu_ms_per_s']:.0f} ms per second of wall time")
        for row in rows[1:]:
            print(f"{where:>5} commits on {row['arm']} / on the loop: "
                  f"{row['commits_per_s'] / baseline['commits_per_s']:.2f}x commits/s, driver CPU "
                  f"{row['driver_cpu_ms_per_1000'] / baseline['driver_cpu_ms_per_1000']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
