"""The command line: prompts listing and exact prompts, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.captioning.prompts import EXTRA_OPTIONS
from pipeline.cli.main import _root_message, main

REPO = Path(__file__).resolve().parents[3]


def test_prompts_lists_the_vocabulary(capsys: pytest.CaptureFixture[str]):
    assert main(["prompts"]) == 0
    out = capsys.readouterr().out
    assert "booru_like" in out and "medium-length" in out and "dual" in out
    assert all(key in out for key in EXTRA_OPTIONS)


def test_prompts_prints_the_exact_chat_string(capsys: pytest.CaptureFixture[str]):
    assert main(["prompts", "--type", "booru_like", "--length", "50", "--extra", "lighting"]) == 0
    out = capsys.readouterr().out
    assert "prompt: Write a list of Booru-like tags for this image within 50 words. Include information about " \
           "lighting." in out
    assert out.count("<|begin_of_text|>") == 1 and "<image>Write a list" in out


def test_prompts_for_a_config_with_overrides(capsys: pytest.CaptureFixture[str]):
    assert main(["prompts", "--config", str(REPO / "configs" / "demo.yaml"), "--set", "modes.0.length=80"]) == 0
    out = capsys.readouterr().out
    assert "[tags]" in out and "within 80 words" in out and "[description]" in out


def test_prompts_rejects_bad_values(capsys: pytest.CaptureFixture[str]):
    assert main(["prompts", "--type", "booru_like", "--length", "huge"]) == 2
    assert "length" in capsys.readouterr().err


def test_the_engine_start_error_is_found_inside_wrapped_errors():
    try:
        try:
            raise RuntimeError("engine failed to start for model '/m': ValueError: bad")
        except RuntimeError as inner:
            raise RuntimeError("The actor died because of an error raised in its creation task\n...") from inner
    except RuntimeError as outer:
        assert _root_message(outer) == "RuntimeError: engine failed to start for model '/m': ValueError: bad"


def test_a_storage_failure_is_named_under_ray_datas_empty_wrappers():
    from ray.data.exceptions import SystemException  # Ray Data chains an empty one under the real error

    try:
        try:
            raise SystemException()
        except SystemException as marker:
            raise RuntimeError("ray::MapBatches(read_and_prepare)()\n  File x\npipeline.io.retry."
                               "TransientStorageError: s3://b/in/a.jpg: storage still failing after 6 attempts") \
                from marker
    except RuntimeError as wrapped:
        assert _root_message(wrapped) == ("TransientStorageError: s3://b/in/a.jpg: storage still failing after 6 "
                                          "attempts")
    try:
        try:
            raise SystemException()
        except SystemException as marker:
            raise ValueError("the real reason") from marker
    except ValueError as plain:
        assert _root_message(plain) == "ValueError: the real reason"


def _wrapped(inner: BaseException) -> RuntimeError:
    """`inner` as a run sees it: raised in a Ray task and wrapped on the way to the driver."""
    try:
        try:
            raise inner
        except BaseException as cause:
            raise RuntimeError("ray::MapBatches(write_stage)() failed") from cause
    except RuntimeError as outer:
        return outer


def test_a_full_disk_or_unwritable_output_is_exit_2_naming_the_path():
    from pipeline.cli.main import explain_failure

    full = OSError(28, "No space left on device")
    code, line = explain_failure(_wrapped(full), "/data/out")
    assert code == 2 and line.startswith("no space left on device: /data/out") and "resume" in line
    denied = PermissionError(13, "Permission denied", "/data/out/_lease.json")
    assert explain_failure(_wrapped(denied), "/data/out") == (2, "permission denied: /data/out/_lease.json")
    text_only = RuntimeError("ray::write_stage\nOSError: [Errno 28] No space left on device")
    assert explain_failure(text_only, "s3://b/out")[0] == 2


def test_refused_credentials_are_exit_2_and_other_failures_exit_1():
    from pipeline.cli.main import explain_failure

    class NoCredentialsError(Exception):  # botocore's, by name: the chain is matched by type name
        pass

    code, line = explain_failure(_wrapped(NoCredentialsError("Unable to locate credentials")), "s3://b/out")
    assert code == 2 and line.startswith("storage refused the credentials for s3://b/out")
    assert explain_failure(_wrapped(ValueError("boom")), "/o") == (1, "run failed: ValueError: boom")


def test_bad_config_fails_in_one_line_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "run.yaml"
    config.write_text("input: {uri: /nowhere}\noutput: {uri: /tmp/o}\nmodel: {path: m}\nmodes: dual\n"
                      "compute: {batch_sise: 3}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == "error: invalid config: compute.batch_sise: unknown key\n"  # one line, naming the key


def test_a_quoted_source_line_is_not_taken_for_the_error():
    text = ("ray::MapWorker.__init__()\n  File \"engine.py\", line 9\n"
            "    raise EngineStartError(f\"engine failed to start for model {path!r}: \"\n"
            "pipeline.engine.actor.EngineStartError: engine failed to start for model '/m/broken': ValidationError: x")
    assert _root_message(RuntimeError(text)) == (
        "pipeline.engine.actor.EngineStartError: engine failed to start for model '/m/broken': ValidationError: x")
