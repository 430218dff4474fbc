"""Exactly once under SIGKILL: kill the whole run at several moments, re-run, every key once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import psutil
import pyarrow.dataset as pads
import pytest

from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import REPO, last_summary, run_cli, write_config

pytestmark = pytest.mark.integration
SHARDS = 5  # ten samples, two per shard


def _markers(out: Path) -> int:
    return len(list((out / "_markers").glob("*.json"))) if (out / "_markers").exists() else 0


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver and everything it started (Ray's raylet, workers, engine processes)."""
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    psutil.wait_procs(family, timeout=30)


def _parts_without_marker(out: Path) -> list[str]:
    parts = {p.name.removeprefix("part-").removesuffix(".parquet") for p in (out / "data").glob("part-*.parquet")} \
        if (out / "data").exists() else set()
    return sorted(shard for shard in parts if not (out / "_markers" / f"{shard}.json").exists())


def _run_until(config: Path, moment: Callable[[], bool], timeout: float = 600,
               env: dict[str, str] | None = None) -> bool:
    """Start the run; SIGKILL it when `moment()` holds. True if it was killed, False if it finished first."""
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if moment():
            _kill_tree(process)
            return True
        time.sleep(0.2)
    _kill_tree(process)
    raise AssertionError("the moment to kill never came")


def test_sigkill_at_several_moments_then_rerun_gives_every_key_exactly_once(tmp_path: Path, tiny_model: Path,
                                                                             samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 2}, compute={"batch_size": 2})
    # 1. Before the first commit: planned, nothing committed yet.
    assert _run_until(config, lambda: (out / "_plan" / "_complete.json").exists())
    assert _markers(out) == 0
    # 2. Mid-way: some shards committed, others in flight.
    assert _run_until(config, lambda: _markers(out) >= 2)
    mid = _markers(out)
    assert 2 <= mid < SHARDS
    # 3. Between a part file and its marker (the commit is held there for a few seconds).
    assert _run_until(config, lambda: bool(_parts_without_marker(out)),
                      env={"PIPELINE_FAILPOINT": "after_part_file:4"})
    # 4. During the last shard.
    killed = _run_until(config, lambda: _markers(out) >= SHARDS - 1)
    assert killed or _markers(out) == SHARDS
    if killed and _markers(out) < SHARDS:  # the killed run's lease is still there; its re-run takes it at once
        assert (out / "_lease.json").exists()
    # 5. The same command finishes only what is missing.
    started = time.monotonic()
    result = run_cli("run", str(config), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "waiting" not in result.stderr and time.monotonic() - started < 300
    assert _markers(out) == SHARDS and not _parts_without_marker(out)
    assert last_summary(out)["images"] == len(SAMPLES)
    assert not (out / "_lease.json").exists()  # released at the end

    expected = sorted(relative for relative, _ in SAMPLES.values())
    keys = pads.dataset(out / "data", format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == expected  # every input key exactly once
    assert not list((out / "_staging").rglob("*.parquet"))
    assert not [p for p in (out / "data").iterdir() if p.name.startswith(".")]

    # DuckDB and Hugging Face datasets read the same table.
    rows = duckdb.sql(f"SELECT key, tags FROM read_parquet('{out}/data/*.parquet') ORDER BY key").fetchall()
    assert [row[0] for row in rows] == expected and all(row[1] for row in rows)
    import datasets

    hf = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(hf["key"]) == expected


@pytest.mark.slow
def test_changed_modes_are_refused_and_overwrite_starts_over(tmp_path: Path, tiny_model: Path, samples: Path):
    out = tmp_path / "out"
    # Only a plan is needed to claim the output: kill the first run as soon as it exists.
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out))
    assert _run_until(config, lambda: (out / "_plan" / "_complete.json").exists())
    changed = write_config(tmp_path / "changed.yaml", tiny_model, str(samples), str(out),
                           modes=[{"name": "tags", "type": "booru_like", "length": 30, "max_tokens": 48}])
    refused = run_cli("run", str(changed))
    assert refused.returncode == 3
    assert "fingerprint" in refused.stderr and "--overwrite" in refused.stderr
    started = run_cli("run", str(changed), "--overwrite", "--json")
    assert started.returncode == 0, started.stderr[-4000:]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [mode["name"] for mode in manifest["modes"]] == ["tags"]
    assert last_summary(out)["images"] == len(SAMPLES)
    assert os.path.exists(out / "data")
