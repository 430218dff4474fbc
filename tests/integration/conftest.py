"""Fixtures for integration tests: the tiny model, the sample photographs, and the CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.table.names import MANIFEST

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def run_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs' log files go to the test session's folder, not the user's ~/.local/state."""
    folder = tmp_path_factory.mktemp("run-logs")
    os.environ["PIPELINE_LOG_DIR"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.testing.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-joycaption")


@pytest.fixture(scope="session")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.testing.samples import write_samples

    root = tmp_path_factory.mktemp("samples")
    write_samples(root)
    return root


def write_config(path: Path, model_dir: Path, input_uri: str, output_uri: str, **sections: object) -> Path:
    """A run config for the tiny model on CPU, with `sections` replacing or adding top-level keys."""
    tree: dict[str, object] = {
        "input": {"uri": input_uri, "shard_size": 4},
        "output": {"uri": output_uri},
        "model": {"path": str(model_dir), "dtype": "float32", "max_model_len": 2048, "kv_cache_space_gb": 1},
        "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 48},
                  {"name": "description", "type": "straightforward", "length": 160, "max_tokens": 64}],
        "compute": {"batch_size": 16},
        "quality": {"retry_on": ["repetition", "refusal", "empty"]},
    }
    tree.update(sections)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def cli_command(*args: str, engine_fault: str | None = None, pause: str | None = None,
                launcher: tuple[str, ...] = ()) -> list[str]:
    """`python -m pipeline ARGS`, as a user runs it; with a hook asked for, the test launcher (tests/launch.py)
    instead: `engine_fault` is KIND@STEP[:ONCE_FILE],... and `pause` MOMENT:SECONDS (pipeline/testing/faults.py);
    `launcher`: more of its flags (`--hold-text-stage`, `--engine-delay`)."""
    hooks = [*(["--engine-fault", engine_fault] if engine_fault else []), *(["--pause", pause] if pause else []),
             *launcher]
    if not hooks:
        return [sys.executable, "-m", "pipeline", *args]
    return [sys.executable, str(REPO / "tests" / "launch.py"), *hooks, *args]


def run_cli(*args: str, timeout: float = 900, env: dict[str, str] | None = None, engine_fault: str | None = None,
            pause: str | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI with ARGS in a fresh process (see `cli_command` for the hooks)."""
    return subprocess.run(cli_command(*args, engine_fault=engine_fault, pause=pause), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def last_summary(output: Path) -> dict[str, object]:
    """The summary the last run stored in the manifest (stdout also carries Ray's worker logs)."""
    return json.loads((output / MANIFEST).read_text())["last_summary"]
