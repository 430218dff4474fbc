"""The fault switch the self-healing tests use: off by default, once per file, and the replacement runs clean."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm.sampling_params import SamplingParams

from pipeline.testing.faults import ENV, FaultyEngine, InjectedEngineFaultError, with_faults
from tests.unit.engine.scripted_engine import ScriptedEngine


def test_unset_leaves_the_engine_as_it_is(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(ENV, raising=False)
    engine = ScriptedEngine()
    assert with_faults(engine) is engine


def test_a_fault_fires_at_its_step_once_per_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(ENV, f"raise@2:{tmp_path / 'fired'}")
    first = with_faults(ScriptedEngine())
    assert isinstance(first, FaultyEngine)
    first.add_request("0", "steps:5", SamplingParams(max_tokens=4))
    first.step()
    with pytest.raises(InjectedEngineFaultError):
        first.step()
    assert with_faults(second := ScriptedEngine()) is second  # the replacement actor's engine is clean


def test_a_malformed_setting_is_refused(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV, "explode@x")
    with pytest.raises(ValueError, match="raise@STEP"):
        with_faults(ScriptedEngine())


def test_successive_actors_take_successive_faults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv(ENV, f"raise@3:{tmp_path / 'one'},hang@4:{tmp_path / 'two'}")
    first, second, third = (with_faults(ScriptedEngine()) for _ in range(3))
    assert (first._kind, first._at_step) == ("raise", 3) and (second._kind, second._at_step) == ("hang", 4)
    assert isinstance(third, ScriptedEngine)
