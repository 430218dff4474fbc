"""Chained modes on the real in-process engine: tags, then a description whose prompt holds the tags, then a
text-only rewrite of the description; a run killed between the stages of a chain is finished by its re-run.
(The same chain on a `vllm serve` server: test_remote_engine.py.)"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.table.names import DATA, MARKERS
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import last_summary, run_cli, write_config
from tests.integration.test_resume import _run_until

pytestmark = pytest.mark.integration

CHAIN = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 32},
         {"name": "description", "prompt": "Write a short description of this image. Its tags: {tags}.",
          "requires": ["tags"], "max_tokens": 48},
         {"name": "short", "prompt": "Rewrite this description in at most 20 words: {mode.description}",
          "requires": ["description"], "image": False, "max_tokens": 24}]


def check_chain(table: pd.DataFrame) -> None:
    """Every row's recorded prompts hold the earlier stages' captions of the same image."""
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())  # each key once
    assert (table.status == "ok").all()
    for row in table.itertuples():
        assert row.description_prompt == f"Write a short description of this image. Its tags: {row.tags}."
        assert row.short_prompt == f"Rewrite this description in at most 20 words: {row.description}"
        assert row.tags and row.short_tokens >= 1


def _markers(out: Path) -> dict[str, bytes]:
    folder = out / MARKERS
    return {path.name: path.read_bytes() for path in folder.glob("*.json")} if folder.exists() else {}


def test_a_chain_runs_in_order_and_a_kill_between_its_stages_is_finished_by_the_rerun(tmp_path: Path,
                                                                                      tiny_model: Path,
                                                                                      samples: Path):
    out, flag = tmp_path / "out", tmp_path / "held"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out), modes=CHAIN,
                          input={"uri": str(samples), "shard_size": 2}, compute={"batch_size": 2})
    # The engine holds at its fifth text-only request: earlier batches are through every stage (and committed,
    # once the driver has their reports), the held one has its tags and descriptions and waits for stage 3.
    assert _run_until(config, lambda: flag.exists() and bool(_markers(out)),
                      launcher=("--hold-text-stage", f"4:600:{flag}")), "the run ended before its last stage was held"
    before = _markers(out)
    shards = len(SAMPLES) // 2
    assert 1 <= len(before) < shards

    result = run_cli("run", str(config), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    after = _markers(out)
    assert len(after) == shards
    assert {name: after[name] for name in before} == before  # what was committed is not redone
    assert last_summary(out)["shards_committed_this_run"] == shards - len(before)
    check_chain(pd.read_parquet(out / DATA))
