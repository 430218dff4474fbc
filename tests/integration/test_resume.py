"""Exactly once under SIGKILL: kill the whole run at several moments, re-run, every key once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import psutil
import pyarrow.dataset as pads
import pytest

from pipeline.table.names import (
    DATA,
    LEASE,
    MANIFEST,
    MARKERS,
    PART_FILE,
    STAGING,
    marker_path,
    part_name,
    part_path,
    plan_done_path,
)
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import REPO, cli_command, last_summary, run_cli, write_config

pytestmark = pytest.mark.integration
SHARDS = 5  # ten samples, two per shard


def _markers(out: Path) -> int:
    return len(list((out / MARKERS).glob("*.json"))) if (out / MARKERS).exists() else 0


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
    parts = {PART_FILE.match(p.name).group(1) for p in (out / DATA).glob(part_name("*"))} \
        if (out / DATA).exists() else set()
    return sorted(shard for shard in parts if not Path(marker_path(str(out), shard)).exists())


def _written_since(out: Path, shard: str, since: float) -> bool:
    with contextlib.suppress(FileNotFoundError):  # a commit replacing it right now
        return Path(part_path(str(out), shard)).stat().st_mtime >= since
    return False


def _waiting_since(out: Path, since: float) -> list[str]:
    """Shards whose part file, written at `since` or later, waits for its marker: a commit of the run started
    then, held between the two (a part file an earlier killed run left does not count)."""
    return [shard for shard in _parts_without_marker(out) if _written_since(out, shard, since)]


def _in_last_commit(out: Path, since: float) -> bool:
    """Every shard has its part file, and the run started at `since` holds a commit before its marker."""
    return _markers(out) + len(_parts_without_marker(out)) == SHARDS and bool(_waiting_since(out, since))


def _run_until(config: Path, moment: Callable[[], bool], timeout: float = 600, pause: str | None = None,
               launcher: tuple[str, ...] = ()) -> bool:
    """Start the run (with `pause`, MOMENT:SECONDS, its commits hold there; `launcher`: more test-launcher flags);
    SIGKILL it and everything it started when `moment()` holds. True if it was killed, False if it finished first."""
    process = subprocess.Popen(cli_command("run", str(config), pause=pause, launcher=launcher), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env=dict(os.environ))
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
    assert _run_until(config, lambda: Path(plan_done_path(str(out))).exists())
    assert _markers(out) == 0
    # 2. Mid-way: some shards committed, others in flight.
    assert _run_until(config, lambda: _markers(out) >= 2)
    mid = _markers(out)
    assert 2 <= mid < SHARDS
    # 3. Between a part file and its marker (the commit is held there for a few seconds).
    begun = time.time()
    assert _run_until(config, lambda: bool(_waiting_since(out, begun)), pause="after_part_file:4")
    assert _waiting_since(out, begun)  # killed inside the hold, not after the marker
    # 4. During the last shard: every part file written, the last commit held before its marker.
    begun = time.time()
    assert _run_until(config, lambda: _in_last_commit(out, begun), pause="after_part_file:4")
    assert _markers(out) < SHARDS and _parts_without_marker(out)  # killed before the run could finish
    assert (out / LEASE).exists()  # the killed run's lease is still there; its re-run takes it at once
    # 5. The same command finishes only what is missing.
    started = time.monotonic()
    result = run_cli("run", str(config), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    # No wait for the killed run's lease (the progress line may say it waits for the first captions).
    assert "for the lease of the silent run" not in result.stderr and time.monotonic() - started < 300
    assert _markers(out) == SHARDS and not _parts_without_marker(out)
    assert last_summary(out)["images"] == len(SAMPLES)
    assert not (out / LEASE).exists()  # released at the end

    expected = sorted(relative for relative, _ in SAMPLES.values())
    keys = pads.dataset(out / DATA, format="parquet").to_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == expected  # every input key exactly once
    assert not list((out / STAGING).rglob("*.parquet"))
    assert not [p for p in (out / DATA).iterdir() if p.name.startswith(".")]

    # DuckDB and Hugging Face datasets read the same table.
    rows = duckdb.sql(f"SELECT key, tags FROM read_parquet('{out}/data/*.parquet') ORDER BY key").fetchall()
    assert [row[0] for row in rows] == expected and all(row[1] for row in rows)
    import datasets

    hf = datasets.load_dataset("parquet", data_files=str(out / DATA / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(hf["key"]) == expected


@pytest.mark.slow
def test_changed_modes_are_refused_and_overwrite_starts_over(tmp_path: Path, tiny_model: Path, samples: Path):
    out = tmp_path / "out"
    # Only a plan is needed to claim the output: kill the first run as soon as it exists.
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out))
    assert _run_until(config, lambda: Path(plan_done_path(str(out))).exists())
    changed = write_config(tmp_path / "changed.yaml", tiny_model, str(samples), str(out),
                           modes=[{"name": "tags", "type": "booru_like", "length": 30, "max_tokens": 48}])
    refused = run_cli("run", str(changed))
    assert refused.returncode == 3
    assert "fingerprint" in refused.stderr and "--overwrite" in refused.stderr
    started = run_cli("run", str(changed), "--overwrite", "--json")
    assert started.returncode == 0, started.stderr[-4000:]
    manifest = json.loads((out / MANIFEST).read_text())
    assert [mode["name"] for mode in manifest["modes"]] == ["tags"]
    assert last_summary(out)["images"] == len(SAMPLES)
    assert os.path.exists(out / DATA)
