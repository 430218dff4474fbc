"""The fault hooks the self-healing and crash tests give a run: a spec checked when built, once per file, the
replacement runs clean, and every hook survives pickling (it travels to actors and commit tasks)."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
from vllm.sampling_params import SamplingParams

from pipeline.run.hooks import AFTER_PART_FILE, RunHooks
from pipeline.testing.faults import EngineFaults, Fault, FaultyEngine, InjectedEngineFaultError, PauseAt
from tests.unit.engine.scripted_engine import ScriptedEngine


def test_a_spec_is_parsed_into_its_faults(tmp_path: Path):
    faults = EngineFaults(f"raise@3:{tmp_path / 'one'}, hang@12")
    assert faults.faults == (Fault("raise", 3, str(tmp_path / "one")), Fault("hang", 12))


@pytest.mark.parametrize("spec", ["explode@2", "raise@x", "raise@0", "raise", "hang@-1", "", " , "])
def test_a_malformed_spec_is_refused_when_built(spec: str):
    with pytest.raises(ValueError, match=r"raise@STEP|no fault"):
        EngineFaults(spec)


def test_a_fault_fires_at_its_step_once_per_file(tmp_path: Path):
    faults = EngineFaults(f"raise@2:{tmp_path / 'fired'}")
    first = faults.wrap(ScriptedEngine())
    assert isinstance(first, FaultyEngine)
    first.add_request("0", "steps:5", SamplingParams(max_tokens=4))
    first.step()
    with pytest.raises(InjectedEngineFaultError):
        first.step()
    assert (tmp_path / "fired").exists()
    assert faults.wrap(second := ScriptedEngine()) is second  # the replacement actor's engine is clean


def test_a_fault_without_a_once_file_reaches_every_actor():
    faults = EngineFaults("hang@7")
    assert all(isinstance(faults.wrap(ScriptedEngine()), FaultyEngine) for _ in range(3))


def test_successive_actors_take_successive_faults(tmp_path: Path):
    faults = EngineFaults(f"raise@3:{tmp_path / 'one'},hang@4:{tmp_path / 'two'}")
    first, second, third = (faults.wrap(ScriptedEngine()) for _ in range(3))
    assert (first._kind, first._at_step) == ("raise", 3) and (second._kind, second._at_step) == ("hang", 4)
    assert isinstance(third, ScriptedEngine)


def test_the_hooks_survive_pickling_and_keep_their_once_files(tmp_path: Path):
    hooks = RunHooks(engine=EngineFaults(f"raise@2:{tmp_path / 'fired'}"), pause=PauseAt(AFTER_PART_FILE, 0.5))
    copy = pickle.loads(pickle.dumps(hooks))
    assert copy.pause == hooks.pause and copy.engine.faults == hooks.engine.faults
    assert isinstance(copy.engine.wrap(ScriptedEngine()), FaultyEngine)  # in the actor's process, say
    assert hooks.engine.wrap(engine := ScriptedEngine()) is engine  # the copy took the once-file


def test_a_pause_holds_at_its_moment_only(monkeypatch: pytest.MonkeyPatch):
    slept: list[float] = []
    monkeypatch.setattr("pipeline.testing.faults.time.sleep", slept.append)
    pause = PauseAt.parse(f"{AFTER_PART_FILE}:0.2")
    pause("another_moment")
    assert slept == []
    pause(AFTER_PART_FILE)
    assert slept == [0.2]


@pytest.mark.parametrize("text", ["after_part_file", "after_part_file:soon", "before_lunch:2", "after_part_file:-1"])
def test_a_malformed_pause_is_refused(text: str):
    with pytest.raises(ValueError, match="pause"):
        PauseAt.parse(text)


def test_an_engine_delay_slows_the_start_and_the_first_step_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.testing import faults as module
    from pipeline.testing.faults import EngineDelay

    slept: list[float] = []
    monkeypatch.setattr(module.time, "sleep", slept.append)
    delay = EngineDelay.parse("start:8, first_step:5")
    assert (delay.start_s, delay.first_step_s) == (8.0, 5.0)
    engine = dataclasses.replace(delay, then=EngineFaults(f"raise@3:{tmp_path / 'fired'}")).wrap(ScriptedEngine())
    assert slept == [8.0]  # the engine counts as built 8 s later
    engine.add_request("0", "steps:5", SamplingParams(max_tokens=4))
    engine.step()
    engine.step()
    assert [seconds for seconds in slept if seconds >= 1] == [8.0, 5.0]  # the first step only
    with pytest.raises(InjectedEngineFaultError):  # the fault still applies after the delays
        engine.step()
    assert pickle.loads(pickle.dumps(delay)) == delay  # it travels to the actors


@pytest.mark.parametrize("text", ["start", "start:x", "begin:3", "start:-1", "first_step:"])
def test_a_malformed_engine_delay_is_refused(text: str):
    from pipeline.testing.faults import EngineDelay

    with pytest.raises(ValueError, match="start:SECONDS"):
        EngineDelay.parse(text)


def test_a_text_stage_hold_waits_at_its_text_only_request_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from pipeline.testing.faults import HoldTextStage

    class Recording:
        def __init__(self) -> None:
            self.added: list[object] = []

        def add_request(self, request_id: str, prompt: object, params: object) -> None:
            self.added.append(prompt)

    slept: list[float] = []
    monkeypatch.setattr("pipeline.testing.faults.time.sleep", slept.append)
    flag = tmp_path / "held"
    hold = HoldTextStage.parse(f"1:30:{flag}")
    assert pickle.loads(pickle.dumps(hold)) == hold  # it travels to the actor with Ray Data's arguments
    inner = Recording()
    engine = hold.wrap(inner)
    raw_image, rendered_image = {"prompt_token_ids": [1], "multi_modal_data": {}}, {"type": "multimodal"}
    text_only = [{"prompt_token_ids": [2]}, {"type": "token"}, {"type": "token"}]
    for prompt in (raw_image, rendered_image, text_only[0]):
        engine.add_request("r", prompt, None)
    assert not slept and not flag.exists()  # images never count; the first text-only request passes
    for prompt in text_only[1:]:
        engine.add_request("r", prompt, None)
    assert slept == [30.0] and flag.exists()  # the second text-only request held, once
    assert inner.added == [raw_image, rendered_image, *text_only]  # every request still reaches the engine


@pytest.mark.parametrize("text", ["x:1:f", "1:-1:f", "1:2:", "1"])
def test_a_malformed_text_stage_hold_is_refused(text: str):
    from pipeline.testing.faults import HoldTextStage

    with pytest.raises(ValueError, match="AFTER:SECONDS:FLAG_FILE"):
        HoldTextStage.parse(text)
