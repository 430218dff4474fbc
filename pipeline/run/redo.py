"""`run --redo`: committed rows chosen by what they hold, re-captioned under `--retry-errors`' rules.

A selection is one or more criteria; a row is redone when any of them matches it:

    confidence<X       some mode's `<mode>_confidence` is below X (also `<=`; `tags.confidence<X` for one mode)
    glitch             some mode's caption has a glitch (`tags.glitch` for one mode)
    glitch=KIND        some mode's glitch is KIND (repetition, truncated, refusal, empty)
    keys=FILE          the key is one of FILE's lines (blank lines ignored)

The selected keys of each committed shard become that shard's retry work, exactly as its error rows do
with `--retry-errors`: the read stage yields only those keys, the commit merges them over the committed
part file (table/fragments.py `keep_committed`), and every key stays once. A redone row's attempts are
numbered after the ones it had (`attempt_base`, the highest `<mode>_attempts` of the row), so its seeds
differ from every earlier attempt's and `<mode>_attempts` counts attempts over all its rounds.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.io.fs import read_bytes
from pipeline.table.ledger import Ledger

_CONFIDENCE = re.compile(r"^(?:(?P<mode>[^.<=]+)\.)?confidence\s*(?P<op><=|<)\s*(?P<value>[0-9.eE+-]+)$")
_GLITCH = re.compile(r"^(?:(?P<mode>[^.=]+)\.)?glitch(?:\s*=\s*(?P<kind>\w+))?$")


@dataclass(frozen=True)
class Below:
    value: float
    inclusive: bool = False
    mode: str | None = None

    def matches(self, confidence: float | None) -> bool:
        if confidence is None or math.isnan(confidence):
            return False
        return confidence <= self.value if self.inclusive else confidence < self.value


@dataclass(frozen=True)
class Glitched:
    kind: str | None = None  # any glitch when None
    mode: str | None = None

    def matches(self, glitch: str | None) -> bool:
        return glitch is not None and (self.kind is None or glitch == self.kind)


@dataclass
class Selection:
    """What `--redo` asked for (the union of its criteria)."""

    below: list[Below] = field(default_factory=list)
    glitched: list[Glitched] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.below or self.glitched or self.keys)

    def modes(self, names: list[str]) -> None:
        """Fail on a criterion naming a mode the run does not have."""
        for criterion in [*self.below, *self.glitched]:
            if criterion.mode is not None and criterion.mode not in names:
                raise ValueError(f"--redo names mode {criterion.mode!r}; the run's modes are {names}")

    def matches(self, row: dict[str, Any], mode_names: list[str]) -> bool:
        if row["key"] in self.keys:
            return True
        for mode in mode_names:
            if any(c.mode in (None, mode) and c.matches(row.get(f"{mode}_confidence")) for c in self.below):
                return True
            if any(c.mode in (None, mode) and c.matches(row.get(f"{mode}_glitch")) for c in self.glitched):
                return True
        return False


def parse_selection(specs: list[str], read_text: Any = None) -> Selection:
    """A Selection from `--redo` values (each may also hold several criteria separated by commas)."""
    read_text = read_text or (lambda path: Path(path).read_text(encoding="utf-8"))
    selection = Selection()
    for spec in specs:
        for part in (piece.strip() for piece in spec.split(",")):
            if not part:
                continue
            if part.startswith("keys="):
                selection.keys.update(line.strip() for line in read_text(part[5:]).splitlines() if line.strip())
                continue
            found = _CONFIDENCE.match(part)
            if found:
                try:
                    value = float(found["value"])
                except ValueError:
                    raise ValueError(f"--redo {part!r}: {found['value']!r} is not a number") from None
                selection.below.append(Below(value, found["op"] == "<=", found["mode"]))
                continue
            found = _GLITCH.match(part)
            if found:
                selection.glitched.append(Glitched(found["kind"], found["mode"]))
                continue
            raise ValueError(f"--redo {part!r}: expected confidence<X, glitch, glitch=KIND or keys=FILE")
    return selection


@dataclass
class RedoWork:
    """Per committed shard: the keys to redo and the attempts each already had."""

    keys: dict[str, list[str]] = field(default_factory=dict)
    bases: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(len(keys) for keys in self.keys.values())


def redo_work(ledger: Ledger, mode_names: list[str], selection: Selection, fingerprint: str | None = None) -> RedoWork:
    """The committed rows `selection` picks, shard by shard (a part file's few columns read at a time); only
    markers of `fingerprint` count (a marker of another config is not committed, see planning)."""
    selection.modes(mode_names)
    work = RedoWork()
    for marker in sorted(ledger.markers(fingerprint), key=lambda marker: marker.shard):
        shard = marker.shard
        handle = pq.ParquetFile(io.BytesIO(read_bytes(ledger.fs, ledger.part_path(marker.part_file()))))
        present = set(handle.schema_arrow.names)
        wanted = ["key", *(f"{mode}{suffix}" for mode in mode_names for suffix in ("_confidence", "_glitch",
                                                                                    "_attempts"))]
        columns = [name for name in wanted if name in present]  # older outputs have no confidence column
        for batch in handle.iter_batches(batch_size=4096, columns=columns):
            for row in batch.to_pylist():
                if not selection.matches(row, mode_names):
                    continue
                base = max((row.get(f"{mode}_attempts") or 0 for mode in mode_names), default=0)
                work.keys.setdefault(shard, []).append(row["key"])
                work.bases.setdefault(shard, {})[row["key"]] = int(base)
    return work
