"""Production code takes test hooks and knobs as arguments and config (pipeline/run/hooks.py,
compute.engine_report_s), never from the environment: no module of the package reads the old switches."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.run.hooks import RunHooks

PACKAGE = Path(__file__).resolve().parents[3] / "pipeline"
RETIRED = ("PIPELINE_FAILPOINT", "PIPELINE_ENGINE_FAULT", "PIPELINE_ENGINE_REPORT_S")


@pytest.mark.parametrize("name", RETIRED)
def test_no_module_reads_a_test_switch_from_the_environment(name: str):
    readers = [str(path.relative_to(PACKAGE.parent)) for path in sorted(PACKAGE.rglob("*.py"))
               if name in path.read_text()]
    assert not readers, f"{name} is read in {readers}: pass a hook (pipeline/run/hooks.py) or a config key instead"


def test_the_launcher_takes_its_hook_flags_and_leaves_the_pipelines_arguments():
    from tests.launch import split_hooks

    hooks, rest = split_hooks(["--engine-fault", "raise@2", "run", "c.yaml", "--pause", "after_part_file:3",
                               "--set", "compute.batch_size=2", "-v"])
    assert rest == ["run", "c.yaml", "--set", "compute.batch_size=2", "-v"]
    assert hooks.engine is not None and hooks.engine.spec == "raise@2"
    assert hooks.pause is not None and (hooks.pause.moment, hooks.pause.seconds) == ("after_part_file", 3.0)
    assert split_hooks(["status", "out"])[0] == RunHooks()
    delayed, rest = split_hooks(["--engine-delay", "start:8", "--engine-fault", "raise@2", "run", "c.yaml"])
    assert rest == ["run", "c.yaml"] and delayed.engine is not None and delayed.engine.start_s == 8.0
    assert delayed.engine.then.spec == "raise@2"  # the fault applies after the delay


def test_the_launcher_refuses_a_bad_fault_in_words(capsys: pytest.CaptureFixture[str]):
    from tests.launch import split_hooks

    with pytest.raises(SystemExit):
        split_hooks(["--engine-fault", "explode@2", "run", "c.yaml"])
    assert "expected raise@STEP or hang@STEP" in capsys.readouterr().err
