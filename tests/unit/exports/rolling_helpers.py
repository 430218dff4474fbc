"""Helpers shared by the Parquet and WebDataset export tests: an output of incompressible images, interruptions."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.unit.exports.fake_output import RealOutput, build_real_output


def noise_images(folder: Path, count: int, seed: int = 0) -> None:
    """`count` PNGs of random pixels (they do not compress), 48 to 80 pixels a side, in a few sub-folders."""
    rng = random.Random(seed)
    for index in range(count):
        side = rng.randint(48, 80)
        path = folder / f"part{index % 3}" / f"img.{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(path)


def noisy_output(tmp_path_factory: pytest.TempPathFactory) -> RealOutput:
    """An output of 250 incompressible images (about 4 MB) in shards of 16, read by the pipeline's readers."""
    root = tmp_path_factory.mktemp("noisy")
    noise_images(root / "in", 250)
    return build_real_output(root / "out", str(root / "in"), "folder", shard_size=16)


class KilledError(RuntimeError):
    """The export was "killed" while finishing a file."""


def interrupt_after(monkeypatch: pytest.MonkeyPatch, cls: type, files: int) -> None:
    """Make the `files + 1`-th file's close fail, as if the export were killed while finishing it."""
    close = cls.close
    calls = {"n": 0}

    def failing(self: Any) -> None:
        calls["n"] += 1
        if calls["n"] > files:
            raise KilledError("killed")
        close(self)

    monkeypatch.setattr(cls, "close", failing)
