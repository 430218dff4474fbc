"""Typed records of a run: a shard's commit marker, per-mode counts, the totals over markers, and the
records the table layer hands upward (the `status` report, a write task's report on its fragments).

A marker is written last when a shard commits (ledger.py) and read back by resume, `status`, the run
summary and exports. `Totals.of(markers)` is the one aggregation all of them use.

A record that leaves the process (as JSON, or as a Ray Data row) has `to_dict()`/`to_row()` giving exactly
the keys it has always been written with, and `from_dict()`/`from_row()` to read it back: the JSON that
`status --json` prints and what stored manifests hold do not change with the classes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa

from pipeline.table.names import part_name


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
    """A committed shard: its counts, the config it was made with, and when and how fast it committed.

    It names its part file (`part`; markers written before the field existed mean `part-<shard>.parquet`),
    the run that wrote it (`holder`, the id of that run's lease; absent in older markers) and the config's
    `fingerprint`: a marker of another fingerprint does not count as done (DESIGN invariant 12)."""

    shard: str
    rows: int = 0
    ok: int = 0
    errors: int = 0
    modes: dict[str, ModeStats] = field(default_factory=dict)
    fingerprint: str | None = None
    committed_at: float | None = None
    commit_s: float | None = None  # from the shard's last row reaching the driver to this marker
    error_reasons: dict[str, int] = field(default_factory=dict)  # error rows by kind of reason
    holder: str | None = None  # the lease holder id (run id) it was written under
    part: str | None = None  # its part file's name in data/

    def part_file(self) -> str:
        """The name of the part file this marker commits (in `data/`)."""
        return self.part or part_name(self.shard)

    def made_with(self, fingerprint: str | None) -> bool:
        """Whether this marker counts as done for a run of config `fingerprint` (unknown on either side: yes)."""
        return fingerprint is None or self.fingerprint is None or self.fingerprint == fingerprint

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

    def modes_report(self) -> dict[str, ModeReport]:
        """Per mode: counts and the glitch rate over captioned images, as the summary and `status` show it."""
        return {name: ModeReport.of(stats, self.ok) for name, stats in self.modes.items()}


def known_fields(cls: type, value: Mapping[str, Any]) -> dict[str, Any]:
    """The items of `value` that are fields of dataclass `cls`, for its `from_dict`: a key a newer writer
    added is skipped, and a missing one keeps the field's default (JSON written before the field existed)."""
    names = {f.name for f in fields(cls)}
    return {name: item for name, item in value.items() if name in names}


@dataclass(frozen=True)
class ModeReport:
    """One mode's counts over some rows, and its glitch rate over the captioned ones: a mode's line in the
    run summary and in `status`."""

    captions: int = 0
    glitched: int = 0
    tokens: int = 0
    retries: int = 0
    glitch_rate: float = 0.0

    @classmethod
    def of(cls, stats: ModeStats, captioned: int) -> ModeReport:
        rate = round(stats.glitched / captioned, 4) if captioned else 0.0
        return cls(stats.captions, stats.glitched, stats.tokens, stats.retries, rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> ModeReport:
        return cls(**known_fields(cls, value))


@dataclass(frozen=True)
class LeaseStatus:
    """The output's lease as `status` reports it: its state ('held', 'stale', 'expired' or 'gone', lease.py),
    which process holds it, and its last heartbeat."""

    state: str
    host: str
    pid: int
    renewed_at: float
    expires_at: float

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> LeaseStatus:
        return cls(**known_fields(cls, value))


@dataclass(frozen=True)
class StatusReport:
    """Where a run stands (pipeline.table.status): plan, counts, quality, and, while a run holds the lease,
    its rate and ETA. The fields, in order, are the keys `status --json` prints."""

    output: str
    fingerprint: str | None = None
    model: str | None = None
    created_at: float | None = None
    plan_complete: bool = False
    images_known: int | None = None
    shards_planned: int = 0
    shards_committed: int = 0
    shards_pending: int = 0
    shards_staging: list[str] = field(default_factory=list)  # shards with fragments written, not committed
    images_done: int = 0
    ok: int = 0
    errors: int = 0
    error_share: float = 0.0
    error_reasons: dict[str, int] = field(default_factory=dict)
    modes: dict[str, ModeReport] = field(default_factory=dict)
    throughput_images_per_s: float | None = None  # since the run was created
    last_commit_at: float | None = None
    last_activity_at: float | None = None  # the last commit or staged fragment
    live: bool = False  # a run holds the lease now
    lease: LeaseStatus | None = None
    shard_rate_per_s: float | None = None
    eta_s: float | None = None
    checked_at: float = 0.0
    engines_last_run: int | None = None  # caption engines the last finished run used (its summary's `engines`)

    @property
    def finished(self) -> bool:
        """Every planned shard is committed, and planning is done."""
        return self.plan_complete and self.shards_pending == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # nested records (modes, lease) become dicts too

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> StatusReport:
        body = known_fields(cls, value)
        body["modes"] = {name: ModeReport.from_dict(stats) for name, stats in (value.get("modes") or {}).items()}
        body["lease"] = LeaseStatus.from_dict(value["lease"]) if value.get("lease") else None
        return cls(**body)


# The Arrow form of WriteReport rows: what the write stage hands Ray Data and the driver reads back.
WRITE_REPORT_SCHEMA = pa.schema([("shard", pa.string()), ("shard_size", pa.int64()), ("keys", pa.list_(pa.string()))])


@dataclass(frozen=True)
class WriteReport:
    """What a write task put in staging for one shard, for the committer: the keys of the fragment, and the
    shard's size (its count of keys) when the fragment holds the shard's last row, else None."""

    shard: str
    shard_size: int | None
    keys: list[str]

    def to_row(self) -> dict[str, Any]:
        return {"shard": self.shard, "shard_size": self.shard_size, "keys": list(self.keys)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WriteReport:
        """From a row as written by `to_row` (or `fragments.write_fragments`), or as Ray Data yields it back
        (the keys may come as an array)."""
        size = row["shard_size"]
        return cls(str(row["shard"]), None if size is None else int(size), [str(key) for key in row["keys"]])

    @staticmethod
    def to_table(reports: Iterable[WriteReport]) -> pa.Table:
        return pa.Table.from_pylist([report.to_row() for report in reports], schema=WRITE_REPORT_SCHEMA)
