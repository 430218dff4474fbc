"""Bad configs fail in seconds, before any engine starts, naming the key or path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.conftest import run_cli, write_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("change, message", [
    ({"bogus_section": {"a": 1}}, "bogus_section: unknown key"),
    ({"input": {"uri": "/nowhere/at/all"}}, "input.uri does not exist: /nowhere/at/all"),
    ({"model": {"path": "/no/such/model"}}, "model.path does not exist: /no/such/model"),
    ({"modes": [{"name": "tags", "type": "booru_like", "length": 5000}]}, "modes.0: mode 'tags'"),
])
def test_bad_config_fails_before_any_engine(tmp_path: Path, tiny_model: Path, samples: Path, change: dict,
                                            message: str):
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"), **change)
    started = time.monotonic()
    result = run_cli("run", str(config_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert time.monotonic() - started < 15
    assert not (tmp_path / "out").exists()
