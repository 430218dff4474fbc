"""`pipeline run` with a misspelled `model.engine_kwargs` key: exit 2 naming it, before Ray or any engine starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main


def test_a_misspelled_engine_argument_exits_2_naming_it_before_anything_starts(tmp_path: Path,
                                                                              capsys: pytest.CaptureFixture[str]):
    (tmp_path / "in").mkdir()
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"path": str(tmp_path), "engine_kwargs": {"max_num_seqz": 8}},
        "modes": [{"name": "tags", "type": "booru_like"}]}))
    ray = sys.modules.get("ray")
    ray_before = ray is not None and ray.is_initialized()  # another test of this process may have started Ray
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid config: ")
    assert "model.engine_kwargs.max_num_seqz: not an engine argument of the installed vLLM" in err
    ray = sys.modules.get("ray")
    assert ray_before or ray is None or not ray.is_initialized()  # no Ray, so no engine, was started
    assert not (tmp_path / "out").exists()  # nor anything written
