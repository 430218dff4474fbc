"""Typed records of a run: a shard's commit marker, per-mode counts, and the totals over markers.

A marker is written last when a shard commits (ledger.py) and read back by resume, `status`, the run
summary and exports. `Totals.of(markers)` is the one aggregation all of them use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa


@dataclass(frozen=True)
class ModeStats:
    """What one mode produced over some rows."""

    captions: int = 0
    glitched: int = 0
    tokens: int = 0
    retries: int = 0

    def __add__(self, other: ModeStats) -> ModeStats:
        return ModeStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ModeStats:
        return cls(**{f.name: int(value.get(f.name) or 0) for f in fields(cls)})

    @classmethod
    def of_table(cls, table: pa.Table, mode: str) -> ModeStats:
        attempts = table.column(f"{mode}_attempts").to_pylist()
        return cls(captions=sum(1 for text in table.column(mode).to_pylist() if text),
                   glitched=sum(1 for glitch in table.column(f"{mode}_glitch").to_pylist() if glitch),
                   tokens=sum(tokens or 0 for tokens in table.column(f"{mode}_tokens").to_pylist()),
                   retries=sum(max(0, (a or 1) - 1) for a in attempts))


@dataclass(frozen=True)
class Marker:
    """A committed shard: its counts, the config it was made with, and when and how fast it committed."""

    shard: str
    rows: int = 0
    ok: int = 0
    errors: int = 0
    modes: dict[str, ModeStats] = field(default_factory=dict)
    fingerprint: str | None = None
    committed_at: float | None = None
    commit_s: float | None = None  # from the shard's last row reaching the driver to this marker
    error_reasons: dict[str, int] = field(default_factory=dict)  # error rows by kind of reason

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "modes": {name: asdict(stats) for name, stats in self.modes.items()}}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Marker:
        known = {f.name for f in fields(cls)}
        body = {name: item for name, item in value.items() if name in known}
        body["modes"] = {name: ModeStats.from_dict(stats) for name, stats in (value.get("modes") or {}).items()}
        return cls(**body)

    @classmethod
    def of(cls, shard: str, value: dict[str, Any]) -> Marker:
        """The marker of `shard` from a dict of its fields (as stored, or as tests write them)."""
        return cls.from_dict({**value, "shard": shard})

    @classmethod
    def of_table(cls, shard: str, table: pa.Table, mode_names: list[str], **facts: Any) -> Marker:
        status = table.column("status").to_pylist()
        reasons: dict[str, int] = {}
        for state, error in zip(status, table.column("error").to_pylist(), strict=True):
            if state == "error":
                reasons[reason_kind(error)] = reasons.get(reason_kind(error), 0) + 1
        return cls(shard, table.num_rows, status.count("ok"), status.count("error"),
                   {name: ModeStats.of_table(table, name) for name in mode_names}, error_reasons=reasons, **facts)


def reason_kind(error: str | None) -> str:
    """The kind of an error reason, for counting: its text before the first colon or parenthesis
    (`truncated or corrupt image`, `not an image`, `empty file`, `unreadable object`, ...), with numbers
    that make every reason unique written as N (`unreadable row group N`)."""
    head = re.split(r"[:(]", error or "unknown", maxsplit=1)[0]
    return re.sub(r"\d+", "N", " ".join(head.split()))[:80] or "unknown"


@dataclass(frozen=True)
class Totals:
    """Counts over committed shards, with per-mode stats in the run's mode order."""

    shards: int
    rows: int
    ok: int
    errors: int
    modes: dict[str, ModeStats]
    error_reasons: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, markers: Iterable[Marker], mode_order: Iterable[str] = ()) -> Totals:
        shards = rows = ok = errors = 0
        modes: dict[str, ModeStats] = {name: ModeStats() for name in mode_order}
        reasons: dict[str, int] = {}
        for marker in markers:
            shards, rows, ok, errors = shards + 1, rows + marker.rows, ok + marker.ok, errors + marker.errors
            for name, stats in marker.modes.items():
                modes[name] = modes.get(name, ModeStats()) + stats
            for reason, count in marker.error_reasons.items():
                reasons[reason] = reasons.get(reason, 0) + count
        return cls(shards, rows, ok, errors, modes, dict(sorted(reasons.items(), key=lambda item: -item[1])))

    @property
    def error_share(self) -> float:
        return self.errors / self.rows if self.rows else 0.0

    def modes_report(self) -> dict[str, dict[str, Any]]:
        """Per mode: counts and the glitch rate over captioned images, as the summary and `status` show it."""
        return {name: {**asdict(stats), "glitch_rate": round(stats.glitched / self.ok, 4) if self.ok else 0.0}
                for name, stats in self.modes.items()}
