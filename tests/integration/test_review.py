"""Confidence per caption, `review` worst first, and `run --redo` re-captioning exactly the selected rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from pipeline.captioning.modes import derive_seed
from pipeline.config import load_config
from pipeline.table.names import DATA
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import run_cli, write_config

pytestmark = pytest.mark.integration
MODES = ["tags", "description"]


def _rows(out: Path) -> dict[str, dict[str, object]]:
    table = pd.read_parquet(out / DATA)
    assert table.key.is_unique
    return {row["key"]: row for row in table.to_dict("records")}


def _rank(entry: dict[str, object]) -> tuple[int, float]:
    return (1 if entry["glitch"] else 2), float(entry["confidence"])  # type: ignore[arg-type]


def test_confidence_is_stored_reviewed_worst_first_and_redo_recaptions_exactly_the_selection(
        tmp_path: Path, tiny_model: Path, samples: Path):
    out = tmp_path / "out"
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out))
    result = run_cli("run", str(config_path), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    before = _rows(out)
    assert len(before) == len(SAMPLES)
    for row in before.values():
        for mode in MODES:
            value = row[f"{mode}_confidence"]
            assert value is not None and not math.isnan(value) and 0.0 <= value <= 1.0, (row["key"], mode, value)

    # review: the worst three captions, flagged ones first, then by ascending confidence.
    listed = run_cli("review", str(out), "--worst", "3", "--json")
    assert listed.returncode == 0, listed.stderr[-4000:]
    worst = json.loads(listed.stdout)
    everything = sorted(((1 if row[f"{m}_glitch"] else 2), float(row[f"{m}_confidence"])) for row in before.values()
                         for m in MODES)
    assert [_rank(entry) for entry in worst] == everything[:3]
    assert [_rank(entry) for entry in worst] == sorted(_rank(entry) for entry in worst)

    # --redo "confidence<X", X from the run's own values: some rows qualify, not all.
    lowest = sorted({min(float(row[f"{m}_confidence"]) for m in MODES) for row in before.values()})
    assert len(lowest) >= 2, "every row has the same confidence: nothing to tell apart"
    middle = len(lowest) // 2
    threshold = (lowest[middle - 1] + lowest[middle]) / 2
    chosen = {key for key, row in before.items() if any(float(row[f"{m}_confidence"]) < threshold for m in MODES)}
    assert 0 < len(chosen) < len(before)
    redo = run_cli("run", str(config_path), "--redo", f"confidence<{threshold!r}", "--json")
    assert redo.returncode == 0, redo.stderr[-4000:]
    after = _rows(out)
    assert set(after) == set(before)  # every key once
    seed = load_config(config_path).seed
    for key, row in after.items():
        old = before[key]
        if key not in chosen:
            assert json.dumps(row, default=str, sort_keys=True) == json.dumps(old, default=str, sort_keys=True), key
            continue
        for mode in MODES:
            assert row[f"{mode}_attempts"] > max(old[f"{m}_attempts"] for m in MODES), (key, mode)
            assert row[f"{mode}_seed"] != old[f"{mode}_seed"], (key, mode)
            assert row[f"{mode}_seed"] == derive_seed(seed, key, mode, row[f"{mode}_attempts"] - 1)
            assert 0.0 <= row[f"{mode}_confidence"] <= 1.0
