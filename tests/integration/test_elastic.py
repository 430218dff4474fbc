"""The cluster as people run it: a run that cannot be placed says what is missing and fails, or runs once a node
joins; the pipeline's metrics on every node's Prometheus endpoint; a pool that grows when a node joins mid-run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from pipeline.table.names import DATA, MARKERS
from pipeline.testing.samples import SAMPLES
from tests.integration.cluster import RayCluster
from tests.integration.conftest import REPO, cli_command, last_summary, write_config

pytestmark = pytest.mark.integration
COPIES = 16  # of the 10 sample photographs, for the elastic pool's run


def _run(cluster: RayCluster, config: Path, log: Path, *args: str) -> subprocess.Popen:
    """`pipeline run CONFIG` against the cluster, its console (stderr) in `log`."""
    return subprocess.Popen(cli_command("run", str(config), *args), cwd=REPO, env=cluster.env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen in {timeout:.0f} s" + (f": {log.read_text()[-3000:]}" if log else ""))


def _metrics_ports(cluster: RayCluster) -> list[int]:
    """Each alive node's Prometheus endpoint: `MetricsExportPort` in `ray.nodes()` (its agent picks the port),
    asked from a process of its own so this one never becomes a Ray driver."""
    code = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(json.dumps([n['MetricsExportPort'] for n in ray.nodes() if n['Alive']]))")
    done = subprocess.run([sys.executable, "-c", code, cluster.gcs_address], env=cluster.env, capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scrape(ports: list[int], into: dict[str, float]) -> None:
    """The pipeline's series from every endpoint, summed over Ray's labels except mode (kept as `name{mode}`)."""
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        except OSError:
            continue
        totals: dict[str, float] = {}
        for line in text.splitlines():
            match = re.match(r"(ray_joycaption_pipeline_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
            if not match:
                continue
            mode = re.search(r'mode="(\w+)"', match[2] or "")
            name = match[1] + (f"{{{mode[1]}}}" if mode else "")
            totals[name] = totals.get(name, 0.0) + float(match[3])
        for name, value in totals.items():
            into[name] = max(into.get(name, 0.0), value)


def test_a_run_that_cannot_be_placed_names_the_missing_cpu_and_fails_then_runs_once_a_node_joins(
        tmp_path: Path, tiny_model: Path, samples: Path):
    with RayCluster(head_cpus=1, auth="disabled") as cluster:
        # One CPU: the engine takes it (compute.cpus_per_actor) and no read task can run beside it.
        compute = {"ray_address": cluster.gcs_address, "cpus_per_actor": 1, "batch_size": 4,
                   "placement_timeout_s": 20}
        failing = write_config(tmp_path / "fail.yaml", tiny_model, str(samples), str(tmp_path / "fail"),
                               compute=compute)
        started = time.monotonic()
        done = subprocess.run(cli_command("run", str(failing)), cwd=REPO, env=cluster.env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 1, done.stderr[-3000:]
        console = done.stderr.splitlines()
        waiting = [line for line in console if "waiting for resources: missing CPU beside the engines" in line]
        errors = [line for line in console if line.startswith("error:")]
        assert waiting and len(errors) == 1, done.stderr[-3000:]
        assert "cannot place the run: missing CPU beside the engines" in errors[0]
        assert "compute.placement_timeout_s" in errors[0] and "0.25 CPU left for a read task" in errors[0]
        assert time.monotonic() - started < 300
        markers = tmp_path / "fail" / MARKERS
        assert not markers.exists() or not any(markers.iterdir())  # nothing committed

        # The same run with time to wait: it says what is missing, a node joins, and it runs. A speed knob of
        # vLLM's reaches the engine on the way (model.engine_kwargs), and the metrics reach Prometheus.
        model = {"path": str(tiny_model), "dtype": "float32", "max_model_len": 2048, "kv_cache_space_gb": 1,
                 "engine_kwargs": {"max_num_batched_tokens": 4096}}
        config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"),
                              model=model, compute={**compute, "placement_timeout_s": 600})
        log = tmp_path / "console.txt"
        process = _run(cluster, config, log)
        try:
            _wait_for(lambda: "waiting for resources: missing CPU" in log.read_text(), 120,
                      "the console naming the missing CPU", process, log)
            cluster.add_worker(num_cpus=2)
            ports, seen = _metrics_ports(cluster), {}
            while process.poll() is None:
                _scrape(ports, seen)
                time.sleep(2)
            _scrape(ports, seen)
            process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
        console = log.read_text()
        assert process.returncode == 0, console[-3000:]
        assert "resources found: the run can be placed now" in console
        table = pd.read_parquet(tmp_path / "out" / DATA)
        assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
        assert (table.status == "ok").all()
        run_log = Path(console.splitlines()[0].removeprefix("log: ")).read_text()
        assert "engine config: max_num_batched_tokens=4096 (scheduler_config)" in run_log
        images = len(SAMPLES)
        assert seen.get("ray_joycaption_pipeline_images_captioned_total", 0) >= images, seen
        assert seen.get("ray_joycaption_pipeline_captions_total{tags}", 0) >= images, seen
        assert seen.get("ray_joycaption_pipeline_captions_total{description}", 0) >= images, seen
        assert seen.get("ray_joycaption_pipeline_shards_committed_total", 0) >= 3, seen
        assert seen.get("ray_joycaption_pipeline_commit_latency_seconds_count", 0) >= 3, seen
        assert seen.get("ray_joycaption_pipeline_engine_up", 0) >= 1, seen
        for gauge in ("requests_in_flight", "requests_waiting", "engine_idle_share"):
            assert f"ray_joycaption_pipeline_{gauge}" in seen, seen
        assert last_summary(tmp_path / "out")["engines"] == 1


@pytest.mark.slow
def test_the_pool_starts_on_the_head_and_grows_to_two_engines_when_a_node_joins(tmp_path: Path, tiny_model: Path,
                                                                               samples: Path):
    images = tmp_path / "images"
    for copy in range(COPIES):  # enough captioning to outlast a second engine's start
        shutil.copytree(samples, images / f"copy{copy}")
    with RayCluster(head_cpus=2, auth="disabled") as cluster:
        # An engine takes 1.5 CPU: one fits the head (beside the read tasks), the second only a new node. The
        # node brings 8 logical CPUs: Ray Data grows a pool only within its operator's share of the cluster's
        # CPUs, and the read and write tasks have shares too (ray/data/_internal/execution/resource_manager.py).
        config = write_config(
            tmp_path / "run.yaml", tiny_model, str(images), str(tmp_path / "out"),
            input={"uri": str(images), "shard_size": 2},
            model={"path": str(tiny_model), "dtype": "float32", "max_model_len": 2048, "kv_cache_space_gb": 1,
                   "cpu_threads": 1},
            modes=[{"name": "tags", "type": "booru_like", "max_tokens": 384},
                   {"name": "description", "type": "straightforward", "max_tokens": 384}],
            defaults={"fixed_length": True},
            compute={"ray_address": cluster.gcs_address, "actors": "1..2", "cpus_per_actor": 1.5, "batch_size": 2})
        log = tmp_path / "console.txt"
        process = _run(cluster, config, log, "--json")
        try:
            markers = tmp_path / "out" / MARKERS
            _wait_for(lambda: markers.exists() and any(markers.glob("*.json")), 600, "the first commit on the head",
                      process, log)
            cluster.add_worker(num_cpus=8)
            out, _ = process.communicate(timeout=1500)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.returncode == 0, log.read_text()[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["engines"] == 2, log.read_text()[-3000:]
        table = pd.read_parquet(tmp_path / "out" / DATA)
        expected = sorted(f"copy{copy}/{relative}" for copy in range(COPIES) for relative, _ in SAMPLES.values())
        assert sorted(table.key) == expected  # every image exactly once
        assert (table.status == "ok").all()
