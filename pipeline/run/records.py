"""Typed records the run layer hands on: a pass's work items, and the run summary with its commit figures.

    WorkItem     planning.WorkList -> driver -> Ray Data (`to_row`) -> stages.read_and_prepare (`from_row`)
    RunSummary   driver.summarise -> the CLI (console, `run --json`) and the manifest's `last_summary`

`to_row()`/`to_dict()` give exactly the keys these values have always had as dicts, so Ray Data's rows,
`run --json` and stored manifests do not change; `from_row()`/`from_dict()` read them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.table.records import ModeReport, known_fields


@dataclass(frozen=True)
class WorkItem:
    """One shard for a pass to read: all of it, or (`only`) just these keys, the error rows of a committed
    shard that `--retry-errors` redoes."""

    shard: str
    only: list[str] | None = None
    bases: list[int] | None = None  # per key of `only`: attempts it already had (`run --redo`, run/redo.py)

    def to_row(self) -> dict[str, Any]:
        row = {"shard": self.shard, "only": None if self.only is None else list(self.only)}
        return row if self.bases is None else {**row, "bases": list(self.bases)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WorkItem:
        only, bases = row.get("only"), row.get("bases")
        return cls(str(row["shard"]), None if only is None else [str(key) for key in only],
                   None if bases is None else [int(base) for base in bases])


def work_rows(items: list[WorkItem]) -> list[dict[str, Any]]:
    """The items as Ray Data rows, every row with the same keys (`bases` on all when any has it)."""
    rows = [item.to_row() for item in items]
    if any("bases" in row for row in rows):
        rows = [{**row, "bases": row.get("bases")} for row in rows]
    return rows


@dataclass(frozen=True)
class CommitStats:
    """How this run's commits went: shards committed per second, commit latency (a shard's last row reaching
    the driver to its marker written), the driver's CPU per 1000 images for its own loop and for commits,
    and where the commits ran. None where nothing was committed this run."""

    per_s: float | None = None
    latency_p50_s: float | None = None
    latency_p99_s: float | None = None
    driver_loop_cpu_ms_per_1000_images: float | None = None
    commit_cpu_ms_per_1000_images: float | None = None
    where: str | None = None

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> CommitStats:
        return cls(**known_fields(cls, value))


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports: counts over the whole output (every committed shard, not only this
    run's), per-mode stats, error reasons, and this run's time and commit figures. The fields, in order,
    are the keys of `run --json` and of the manifest's `last_summary`."""

    output: str
    shards: int = 0
    shards_committed_this_run: int = 0
    images: int = 0
    ok: int = 0
    errors: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)  # error rows by kind, most frequent first
    modes: dict[str, ModeReport] = field(default_factory=dict)
    seconds: float = 0.0
    fingerprint: str | None = None
    commits: CommitStats = field(default_factory=CommitStats)
    # This run's content index (pipeline.engine.dedup): `captioned` images sent to an engine, `reused` rows
    # given another key's captions, `recaptioned` duplicates captioned again; empty with compute.dedup off.
    duplicates: dict[str, int] = field(default_factory=dict)
    engines: int | None = None  # caption actors that returned batches this run (None: nothing captioned)
    # Nodes seen alive that died while this run was captioning (run/nodes.py): their work in flight was redone.
    nodes_lost: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # nested records (modes, commits) become dicts too

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> RunSummary:
        body = known_fields(cls, value)
        body["modes"] = {name: ModeReport.from_dict(stats) for name, stats in (value.get("modes") or {}).items()}
        body["commits"] = CommitStats.from_dict(value.get("commits") or {})
        return cls(**body)
