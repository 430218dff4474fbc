"""The command line: prompts listing and exact prompts, without starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import _root_message, main
from pipeline.prompts import EXTRA_OPTIONS

REPO = Path(__file__).resolve().parents[2]


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
