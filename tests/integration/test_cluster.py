"""Running on a Ray cluster: a real head and worker node, `pipeline submit` to it, and faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import REPO, run_cli, write_config

pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def cluster() -> Iterator[str]:
    """A head node and a worker node started with `ray start` on loopback; yields the job server address."""
    gcs, dashboard = _free_port(), _free_port()
    # A short temp dir: Ray's Unix sockets live there and socket paths are limited to ~107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Ray 2.60's `ray start --head` turns on token authentication; a loopback test cluster opts out
    # (jobs/README.md says how real clusters share the token).
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    common = ["--disable-usage-stats", "--num-gpus=0", "--node-ip-address=127.0.0.1"]
    # Each node's dashboard agent gets a port of its own: on the default (52365) the second agent to start
    # (under load, often the head's) cannot bind, stays up without its HTTP server, and the job server then
    # answers "No available agent" forever. Any other local Ray holding 52365 would do the same.
    subprocess.run([RAY, "start", "--head", f"--port={gcs}", "--num-cpus=1", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--dashboard-agent-listen-port={_free_port()}", *common], env=env, check=True,
                   capture_output=True, timeout=180)
    try:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                        f"--dashboard-agent-listen-port={_free_port()}", *common], env=env,
                       check=True, capture_output=True, timeout=180)
        os.environ["RAY_AUTH_MODE"] = "disabled"  # for `pipeline submit`, run with this environment
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(address, env)
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        os.environ.pop("RAY_AUTH_MODE", None)


def _wait_for_job_agent(address: str, env: dict[str, str], timeout: float = 300) -> None:
    """The job server answers before its agent registers ("No available agent"): wait for a trivial job.

    The agent took over 120 s on a busy 2-core machine once, hence the long limit."""
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run([RAY, "job", "submit", "--address", address, "--", "true"], env=env,
                               capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the job server never accepted a job: {probe.stderr[-2000:]}")
        time.sleep(2)


def test_a_config_outside_the_project_is_submitted_to_a_two_node_cluster(tmp_path: Path, tiny_model: Path,
                                                                         samples: Path, cluster: str):
    out = tmp_path / "out"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = write_config(job_dir / "run.yaml", tiny_model, str(samples), str(tmp_path / "placeholder"),
                          compute={"ray_address": "auto", "batch_size": 8})
    assert not config.resolve().is_relative_to(REPO)  # it reaches the cluster only by travelling with the job
    started = time.monotonic()
    # --output is applied here, into the config that travels; the job reads nothing from this folder.
    submitted = run_cli("submit", str(config), "--address", cluster, "--submission-id", "cluster-test",
                        "--output", str(out), timeout=900)
    assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
    assert "job cluster-test succeeded" in submitted.stderr
    assert f"pipeline jobs stop cluster-test --address {cluster}" in submitted.stderr
    table = pd.read_parquet(out / "data")
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
    assert (table.status == "ok").all() and table.tags.str.len().gt(0).all()
    assert not (tmp_path / "placeholder").exists()
    assert "shards" in submitted.stdout  # the job's progress lines, followed from here
    assert time.monotonic() - started < 900
    status = run_cli("jobs", "status", "cluster-test", "--address", cluster, "--json", timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    report = json.loads(status.stdout)
    assert (report["status"], report["exit_code"], report["output"]) == ("SUCCEEDED", 0, str(out.resolve()))


def _caption_actor_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "MapWorker(MapBatches(CaptionActor))" in cmdline:
            found.append(process)
    return found


@pytest.mark.slow
def test_a_killed_caption_actor_is_replaced_and_every_image_lands_once(tmp_path: Path, tiny_model: Path,
                                                                        samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2}, compute={"batch_size": 2})
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    killed = None
    while time.monotonic() < deadline and process.poll() is None:
        markers = list((out / "_markers").glob("*.json")) if (out / "_markers").exists() else []
        actors = _caption_actor_processes()
        if markers and actors:  # captioning is under way: kill the actor mid-run
            killed = actors[0].pid
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    assert killed is not None, "the run ended before an actor could be killed"
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    table = pd.read_parquet(out / "data")
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
    assert (table.status == "ok").all()


def test_an_engine_that_cannot_start_fails_the_run_fast_with_its_error(tmp_path: Path, samples: Path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava", "architectures": ["NoSuchModel"]}')
    config = write_config(tmp_path / "run.yaml", broken, str(samples), str(tmp_path / "out"))
    started = time.monotonic()
    result = run_cli("run", str(config), timeout=600)
    assert result.returncode != 0
    assert time.monotonic() - started < 300
    assert "engine failed to start" in result.stderr
    assert "NoSuchModel" in result.stderr or "broken-model" in result.stderr
