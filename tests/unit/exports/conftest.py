"""The `fake_output` fixture: a committed-and-unfinished output folder (see fake_output.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.exports.fake_output import FakeOutput, build_output


@pytest.fixture
def fake_output(tmp_path: Path) -> FakeOutput:
    return build_output(tmp_path)
