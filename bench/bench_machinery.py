"""The pipeline's machinery without the engine: can one driver keep up with 64 GPUs?

    python bench/bench_machinery.py [--images 4096] [--shard-size 256] [--json OUT]
    python bench/bench_machinery.py --compare-workers [--rounds 2] [--images 4096]

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

Every arm also counts the Ray worker processes started during it and the CPU of the whole run: the driver
plus every process of the local Ray (raylet, GCS, agents, every worker), sampled from /proc every 0.1 s.
Ray runs with the settings a run gives the local Ray it starts (pipeline/run/ray_session.py).
`--compare-workers` runs only the default arm (local disk, 4 commit threads), in turns on a Ray with Ray's
own worker settings (what runs had before: an idle worker killed after 1 s beyond one per CPU) and on one
with the run's, `--rounds` times, and gives the ratios of whole-run CPU per image and of workers started.
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


class RunProcesses:
    """The CPU seconds of this process's descendants (the local Ray: raylet, GCS, agents, every worker) while a
    run goes on, and the Ray workers started meanwhile, from /proc every `every_s` seconds. A process is known
    by its pid and start time; its CPU is the last figure seen (a worker that lives a second is seen ten
    times). `skip`: pids that are not the run's (the S3 server)."""

    AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")

    def __init__(self, skip: set[int], every_s: float = 0.1) -> None:
        self.skip, self.every_s = skip, every_s
        self.cpu: dict[tuple[int, float], float] = {}
        self.at_start: dict[tuple[int, float], float] = {}
        self.workers: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RunProcesses:
        self.at_start = self._sample(count_workers=False)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(count_workers=True)

    @property
    def cpu_s(self) -> float:
        return sum(cpu - self.at_start.get(key, 0.0) for key, cpu in self.cpu.items())

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample(count_workers=True)

    def _sample(self, count_workers: bool) -> dict[tuple[int, float], float]:
        import psutil

        seen = {}
        for process in psutil.Process().children(recursive=True):
            if process.pid in self.skip:
                continue
            with contextlib.suppress(psutil.Error):
                with process.oneshot():
                    key, times, name = (process.pid, process.create_time()), process.cpu_times(), process.name()
                seen[key] = self.cpu[key] = times.user + times.system
                if count_workers and name.startswith("ray::") and name not in self.AGENTS \
                        and key not in self.at_start:
                    self.workers.add(key)
        return seen


def start_ray(settings: str) -> None:
    """A local Ray of this benchmark's own: `pipeline` with the settings a run gives the Ray it starts,
    `ray-defaults` with Ray's own."""
    import ray

    from pipeline.run.ray_session import local_system_config

    extra = {"_system_config": local_system_config(None)} if settings == "pipeline" else {}
    ray.init(address="local", include_dashboard=False, log_to_driver=False, **extra)


# (label, compute keys): the first is the baseline
ARMS = (("loop", {"commit_threads": 0}), ("4 threads", {"commit_threads": 4}), ("4 tasks", {"commit_tasks": 4}))


def run_once(input_uri: str, output_uri: str, arm: str, commits: dict[str, int], shard_size: int,
             skip: frozenset[int] = frozenset()) -> dict[str, Any]:
    from pipeline.config import build_config
    from pipeline.run.driver import execute

    config = build_config({
        "input": {"uri": input_uri, "shard_size": shard_size}, "output": {"uri": output_uri},
        "model": {"path": "unused-by-the-stand-in"}, "modes": "dual",
        "compute": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 64, **commits}})
    cpu, started = _cpu(), time.perf_counter()
    with ExecutorCpu() as executor, RunProcesses(skip) as processes:
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
            "loop_cpu_ms_per_1000": figures.driver_loop_cpu_ms_per_1000_images,
            "workers_started": len(processes.workers),
            "run_cpu_ms_per_1000": round(1e6 * (cpu + processes.cpu_s) / images, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256, help="the default input.shard_size")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compare-workers", action="store_true",
                        help="only the default arm, on Ray's own worker settings and on the run's, in turns")
    parser.add_argument("--rounds", type=int, default=2, help="turns of --compare-workers")
    args = parser.parse_args()
    if args.compare_workers:
        return compare_workers(args)
    server, endpoint = _moto()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, NO_PROXY="127.0.0.1,localhost")
    import s3fs

    results: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            images = Path(scratch) / "images"
            _images(images, args.images)
            fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
            fs.mkdir("bench")
            fs.put(str(images) + "/", "bench/images/", recursive=True)
            start_ray("pipeline")  # outside the timed runs
            for where, source, target in (("local", str(images), str(Path(scratch) / "out")),
                                          ("s3", "s3://bench/images", "s3://bench/out")):
                results[where] = [run_once(source, target, arm, commits, args.shard_size, frozenset({server.pid}))
                                  for arm, commits in ARMS]
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
                  f"{row['driver_cpu_ms_per_s']:.0f} ms per second of wall time; the whole run (driver and "
                  f"Ray) {row['run_cpu_ms_per_1000']:.1f} ms/1000 images, {row['workers_started']} workers started")
        for row in rows[1:]:
            print(f"{where:>5} commits on {row['arm']} / on the loop: "
                  f"{row['commits_per_s'] / baseline['commits_per_s']:.2f}x commits/s, driver CPU "
                  f"{row['driver_cpu_ms_per_1000'] / baseline['driver_cpu_ms_per_1000']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def compare_workers(args: argparse.Namespace) -> int:
    """The default arm on Ray's own worker settings and on the run's, in turns (a shared machine drifts)."""
    import statistics

    import ray

    rows: dict[str, list[dict[str, Any]]] = {"ray-defaults": [], "pipeline": []}
    with tempfile.TemporaryDirectory() as scratch:
        images = Path(scratch) / "images"
        _images(images, args.images)
        for _ in range(args.rounds):
            for settings in rows:
                start_ray(settings)
                try:
                    row = run_once(str(images), str(Path(scratch) / "out"), "4 threads", dict(ARMS[1][1]),
                                   args.shard_size)
                finally:
                    ray.shutdown()
                rows[settings].append({**row, "settings": settings})
                print(f"{settings:<12} {row['images_per_s']:8.1f} images/s, whole run {row['run_cpu_ms_per_1000']:.1f}"
                      f" CPU-ms/1000 images (driver {row['driver_cpu_ms_per_1000']:.1f}), "
                      f"{row['workers_started']} workers started", flush=True)

    def median(settings: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[settings])

    before, after = "ray-defaults", "pipeline"
    print(f"{args.images} images, shards of {args.shard_size}, {args.rounds} rounds, medians: whole-run CPU per image "
          f"{median(after, 'run_cpu_ms_per_1000') / median(before, 'run_cpu_ms_per_1000'):.2f}x "
          f"({median(before, 'run_cpu_ms_per_1000'):.1f} -> {median(after, 'run_cpu_ms_per_1000'):.1f} ms/1000), "
          f"workers started {median(before, 'workers_started'):.0f} -> {median(after, 'workers_started'):.0f}, "
          f"images/s {median(after, 'images_per_s') / median(before, 'images_per_s'):.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
