"""One writer per output, nothing deleted that is not ours, inputs as users mean them (real runs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.table.names import DATA, LEASE
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import REPO, last_summary, run_cli, write_config

pytestmark = pytest.mark.integration


def _keys(out: Path) -> list[str]:
    return sorted(pads.dataset(out / DATA, format="parquet").to_table(columns=["key"]).column("key").to_pylist())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_runs_started_at_once_on_one_output_one_refused_in_words(tmp_path: Path, tiny_model: Path,
                                                                      samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 3},
                          compute={"batch_size": 16, "commit_tasks": 4})  # commits as Ray tasks
    runs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(run.pid, *run.communicate(timeout=900), run.returncode) for run in runs]
    codes = sorted(code for *_, code in results)
    assert codes == [0, 4], [(code, err[-2000:]) for _, _, err, code in results]
    (winner,) = [pid for pid, _, _, code in results if code == 0]
    (refused,) = [err for _, _, err, code in results if code == 4]
    assert "is being written by another run" in refused and f"pid {winner}" in refused
    assert "Traceback" not in refused
    assert _keys(out) == sorted(relative for relative, _ in SAMPLES.values())  # every image exactly once
    assert not (out / LEASE).exists()


@pytest.mark.slow
def test_foreign_files_spellings_a_grown_input_and_overwrite(tmp_path: Path, tiny_model: Path, samples: Path):
    names = sorted(relative for relative, _ in SAMPLES.values())
    first, later = names[:3], names[3:5]
    folder = tmp_path / "in"
    for name in first:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples / name, folder / name)
    (tmp_path / "link").symlink_to(folder)
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "cat.jpg").write_bytes((samples / first[0]).read_bytes())
    (out / "notes.txt").write_text("the user's own notes")
    users = _files(out)
    config = write_config(tmp_path / "run.yaml", tiny_model, str(tmp_path / "link"), str(out),
                          input={"uri": str(tmp_path / "link"), "shard_size": 2})

    # A folder that is not an output: refused in words, nothing written.
    refused = run_cli("run", str(config))
    assert refused.returncode == 2 and "--allow-existing" in refused.stderr, refused.stderr[-2000:]
    assert _files(out) == users
    done = run_cli("run", str(config), "--allow-existing")
    assert done.returncode == 0, done.stderr[-4000:]
    assert _keys(out) == first and last_summary(out)["images"] == 3
    parts = {name: data for name, data in _files(out).items() if name.startswith("data/")}

    # The same input spelled as a URI and with a trailing slash: the same output, nothing to do.
    for spelling in (f"file://{folder}", f"{folder}/"):
        again = run_cli("run", str(config), "--input", spelling)
        assert again.returncode == 0, again.stderr[-4000:]
        assert last_summary(out)["shards_committed_this_run"] == 0

    # The input grows: only the new images are captioned, in a new shard; committed parts are untouched.
    for name in later:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples / name, folder / name)
    grown = run_cli("run", str(config))
    assert grown.returncode == 0, grown.stderr[-4000:]
    assert "2 new images in 1 new shards" in grown.stderr
    assert _keys(out) == sorted(first + later) and last_summary(out)["shards_committed_this_run"] == 1
    assert all(_files(out)[name] == data for name, data in parts.items())

    # A file gone from the input is reported; its row stays.
    (folder / first[0]).unlink()
    gone = run_cli("run", str(config))
    assert gone.returncode == 0 and "1 files planned before are gone from the input" in gone.stderr
    assert _keys(out) == sorted(first + later)

    # --overwrite starts over and deletes only what runs wrote.
    fresh = run_cli("run", str(config), "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert _keys(out) == sorted(first[1:] + later)
    assert {name: data for name, data in _files(out).items() if name in users} == users
