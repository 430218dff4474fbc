"""Running on a Ray cluster: a real head and worker node, `pipeline submit` to it, and faults."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest

from pipeline.table.names import DATA, MARKERS
from pipeline.testing.samples import SAMPLES
from tests.integration.cluster import AUTH_VARIABLES, Node, RayCluster
from tests.integration.conftest import REPO, cli_command, last_summary, run_cli, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster() -> Iterator[RayCluster]:
    """A head node (1 CPU) and a worker node (2 CPUs) started with `ray start` on loopback, with Ray 2.60's
    token authentication on, as users meet it (tests/integration/cluster.py)."""
    with RayCluster(head_cpus=1) as ray_cluster:
        ray_cluster.add_worker(num_cpus=2)
        ray_cluster.wait_for_job_agent()
        yield ray_cluster


def _pipeline(cluster: RayCluster, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """The CLI as a user on the head node runs it: no RAY_AUTH_* variable, the token only in ~/.ray/auth_token."""
    assert cluster.token and not any(name in cluster.env for name in AUTH_VARIABLES)
    return subprocess.run(cli_command(*args), cwd=REPO, env=cluster.env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_config_outside_the_project_is_submitted_to_a_two_node_cluster(tmp_path: Path, tiny_model: Path,
                                                                         samples: Path, cluster: RayCluster):
    out = tmp_path / "out"
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    config = write_config(job_dir / "run.yaml", tiny_model, str(samples), str(tmp_path / "placeholder"),
                          compute={"ray_address": "auto", "batch_size": 8})
    assert not config.resolve().is_relative_to(REPO)  # it reaches the cluster only by travelling with the job
    started = time.monotonic()
    # --output is applied here, into the config that travels; the job reads nothing from this folder.
    # The job server asks for a token; `pipeline submit` finds it as a user's does, with nothing set.
    submitted = _pipeline(cluster, "submit", str(config), "--address", cluster.address, "--submission-id",
                          "cluster-test", "--output", str(out), timeout=900)
    assert submitted.returncode == 0, (submitted.stdout[-3000:], submitted.stderr[-3000:])
    assert "job cluster-test succeeded" in submitted.stderr
    assert f"pipeline jobs stop cluster-test --address {cluster.address}" in submitted.stderr
    table = pd.read_parquet(out / DATA)
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
    assert (table.status == "ok").all() and table.tags.str.len().gt(0).all()
    assert not (tmp_path / "placeholder").exists()
    assert "shards" in submitted.stdout  # the job's progress lines, followed from here
    assert time.monotonic() - started < 900
    status = _pipeline(cluster, "jobs", "status", "cluster-test", "--address", cluster.address, "--json", timeout=120)
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
        markers = list((out / MARKERS).glob("*.json")) if (out / MARKERS).exists() else []
        actors = _caption_actor_processes()
        if markers and actors:  # captioning is under way: kill the actor mid-run
            killed = actors[0].pid
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.5)
    assert killed is not None, "the run ended before an actor could be killed"
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    table = pd.read_parquet(out / DATA)
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
    assert (table.status == "ok").all()


def _caption_actors_on(cluster: RayCluster, node: Node) -> list[psutil.Process]:
    found = []
    for process in cluster.processes(node):
        with contextlib.suppress(psutil.Error):
            if "CaptionActor" in " ".join(process.cmdline()):
                found.append(process)
    return found


@pytest.mark.slow
def test_a_lost_node_costs_only_its_work_in_flight_and_the_console_names_it(tmp_path: Path, tiny_model: Path,
                                                                             samples: Path):
    """The worker node holding the caption actor is killed mid-run (as a spot preemption ends a machine) and a
    replacement joins: the run finishes, every image lands exactly once, and the console and the log say which
    node was lost, that its engine is being replaced and its work redone, and that the replacement joined."""
    out, console_out, console_err = tmp_path / "out", tmp_path / "console.out", tmp_path / "console.err"
    with RayCluster(head_cpus=1) as cluster:  # the head: the driver and the read and write tasks
        spot = cluster.add_worker(num_cpus=2, resources={"spot": 1})  # the only node an engine of 2 CPUs fits
        cluster.wait_for_node(spot, "ALIVE")
        # The driver joins the cluster as a user on the head runs it (Ray connects it to the head's raylet);
        # with an explicit address Ray sends the token only with RAY_AUTH_MODE=token.
        config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                              input={"uri": str(samples), "shard_size": 2},
                              compute={"ray_address": cluster.gcs_address, "batch_size": 2, "cpus_per_actor": 2})
        with console_out.open("w") as stdout, console_err.open("w") as stderr:
            process = subprocess.Popen(cli_command("run", str(config)), cwd=REPO, env=cluster.ray_cli_env,
                                       stdout=stdout, stderr=stderr, text=True)
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and process.poll() is None:
                markers = list((out / MARKERS).glob("*.json")) if (out / MARKERS).exists() else []
                if markers and _caption_actors_on(cluster, spot):  # captioning is under way on the spot node
                    break
                time.sleep(0.5)
            assert process.poll() is None, f"the run ended before the node could be killed: {console_err.read_text()}"
            committed_before = len(list((out / MARKERS).glob("*.json")))
            assert committed_before < len(SAMPLES) // 2, "nothing was left to caption when the node was killed"
            cluster.kill_node(spot)
            cluster.wait_for_node(spot, "DEAD")
            replacement = cluster.add_worker(num_cpus=2, resources={"spot": 1})
            process.wait(timeout=900)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        console = console_out.read_text() + console_err.read_text()
        assert process.returncode == 0, console[-4000:]
    table = pd.read_parquet(out / DATA)
    assert table.key.is_unique  # exactly once: no image twice, though a batch was redone...
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())  # ...and none missing
    assert (table.status == "ok").all()
    assert len(list((out / MARKERS).glob("*.json"))) == len(SAMPLES) // 2
    # The node's address is the one Ray sees (not always 127.0.0.1 on a loopback cluster); its id is the raylet's.
    lost = re.compile(rf"node \S+ \(id {spot.node_id[:8]}\) lost: 1 caption engine on it is being replaced, its \d+ "
                      r"batch(es)? in flight (is|are) redone")
    assert lost.search(console), console[-4000:]
    assert re.search(rf"node \S+ \(id {replacement.node_id[:8]}\) joined \(2 CPUs\)", console), console[-4000:]
    [log_line] = [line for line in console.splitlines() if line.startswith("log: ")]
    assert lost.search(Path(log_line.removeprefix("log: ").strip()).read_text())
    print(next(line for line in console.splitlines() if lost.search(line)))  # for the record (pytest -s)
    # The summary keeps the count: on the console and in `run --json` / the manifest.
    assert re.search(rf"nodes +1 lost mid-run \(node \S+ \(id {spot.node_id[:8]}\)\)", console), console[-4000:]
    assert [name.split("(id ")[1][:8] for name in last_summary(out)["nodes_lost"]] == [spot.node_id[:8]]


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


@pytest.mark.slow
def test_the_harness_kills_a_node_as_a_preemption_does_and_a_replacement_joins():
    with RayCluster() as cluster:
        [head] = cluster.nodes
        spot = cluster.add_worker(num_cpus=1, resources={"spot": 1})
        cluster.wait_for_node(spot, "ALIVE")
        mine = {process.pid for process in cluster.processes(spot)}
        assert spot.raylet_pid in mine and not mine & {process.pid for process in cluster.processes(head)}
        killed = cluster.kill_node(spot)
        assert spot.raylet_pid in killed and not cluster.processes(spot) and not psutil.pid_exists(spot.raylet_pid)
        assert psutil.pid_exists(head.raylet_pid)  # the rest of the cluster lives on
        cluster.wait_for_node(spot, "DEAD")
        replacement = cluster.add_worker(num_cpus=1, resources={"spot": 1})
        cluster.wait_for_node(replacement, "ALIVE")
        assert replacement.node_id != spot.node_id and cluster.node_state(head) == "ALIVE"
        alive = [entry for entry in cluster.list_nodes() if entry["state"] == "ALIVE"]
        assert sorted(entry["resources_total"].get("spot", 0) for entry in alive) == [0, 1]
        assert cluster.processes()
    assert cluster.processes() == []  # stop() left nothing of it
