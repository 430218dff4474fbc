"""Duplicates captioned once: a folder where a third of the images are byte-identical copies under other names."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.table.names import DATA
from tests.integration.conftest import last_summary, run_cli, write_config
from tests.integration.test_resume import _markers, _run_until

pytestmark = pytest.mark.integration
QUICK_MODES = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 8}]


def _with_copies(samples: Path, folder: Path) -> dict[str, int]:
    """The samples, and a copy of every other one under another name: 15 images, 5 of them copies. Returns
    how many files hold each content."""
    shutil.copytree(samples, folder)
    originals = sorted(p for p in folder.rglob("*") if p.is_file())
    for n, path in enumerate(originals[::2]):
        shutil.copyfile(path, folder / f"copy{n}_{path.name}")
    contents: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            contents[digest] = contents.get(digest, 0) + 1
    return contents


def _content(row: pd.Series) -> str:
    return hashlib.sha256(Path(row.source.removeprefix("file://")).read_bytes()).hexdigest()


def _check_duplicates(table: pd.DataFrame, contents: dict[str, int]) -> pd.DataFrame:
    """Every key once; a duplicate points at an original (a row captioned for itself) of the same content,
    and carries its captions and what produced them."""
    assert table.key.is_unique and len(table) == sum(contents.values())
    assert (table.status == "ok").all()
    by_key = table.set_index("key")
    copies = table[table.duplicate_of.notna()]
    for row in copies.itertuples():
        original = by_key.loc[row.duplicate_of]
        assert pd.isna(original.duplicate_of)  # an original, not a copy of a copy
        assert _content(pd.Series(row._asdict())) == _content(original)
        for column in ("tags", "tags_prompt", "tags_seed", "tags_tokens", "tags_finish_reason"):
            assert getattr(row, column) == original[column], column
    return copies


def test_duplicates_are_captioned_once_and_point_at_their_original(tmp_path: Path, tiny_model: Path,
                                                                    samples: Path):
    folder, out = tmp_path / "in", tmp_path / "out"
    contents = _with_copies(samples, folder)
    assert len(contents) == 10 and sum(contents.values()) == 15
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), modes=QUICK_MODES)
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(out / DATA)
    copies = _check_duplicates(table, contents)
    assert len(copies) == 5  # every second content has one more file
    summary = last_summary(out)
    # One engine request per distinct image: the five copies reused their original's captions.
    assert summary["duplicates"] == {"captioned": 10, "reused": 5, "recaptioned": 0}


def test_dedup_off_captions_every_image(tmp_path: Path, tiny_model: Path, samples: Path):
    folder, out = tmp_path / "in", tmp_path / "out"
    contents = _with_copies(samples, folder)
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), modes=QUICK_MODES,
                          compute={"batch_size": 16, "dedup": False})
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(out / DATA)
    assert len(table) == sum(contents.values()) and table.duplicate_of.isna().all()
    assert last_summary(out)["duplicates"] == {}


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_keeps_every_key_once_with_duplicates_on_originals(tmp_path: Path,
                                                                                      tiny_model: Path,
                                                                                      samples: Path):
    folder, out = tmp_path / "in", tmp_path / "out"
    contents = _with_copies(samples, folder)
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), modes=QUICK_MODES,
                          input={"uri": str(folder), "shard_size": 2}, compute={"batch_size": 2})
    assert _run_until(config, lambda: _markers(out) >= 2)  # killed with some shards committed, others in flight
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(out / DATA)
    _check_duplicates(table, contents)
    # Copies of a content captioned before the kill are captioned again by the re-run (its index starts empty),
    # so some may be originals now; none is lost or repeated, and none points at a copy.
    assert table.duplicate_of.notna().sum() <= 5
