"""What a run has to do: claim the output, check its fingerprint, plan (or grow) the shards, list the work.

Planning is streamed. A new output lists the input once and stores one plan file per shard. A re-run of
an unfinished output trusts its plan and skips the listing (resume only finishes what was planned). A
re-run of a finished output lists the input again and plans what is new into new shards after the last
one, leaving committed shards untouched; files planned before and gone now are reported, never dropped
from the table. The diff holds 64-bit hashes of the units, not their names: with the arrays' sorted copies
and the file-list de-duplication beside them, about 90 bytes of driver memory per planned unit at the peak
(measured on a million, bench/bench_plan.py).
"""

from __future__ import annotations

import hashlib
import logging
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import RunConfig
from pipeline.io.sources import Shard, plan_shards
from pipeline.run.records import WorkItem
from pipeline.run.redo import Selection, redo_work
from pipeline.table.fragments import error_keys
from pipeline.table.ledger import Ledger
from pipeline.table.records import Marker

log = logging.getLogger("pipeline.run.planning")


@dataclass
class WorkList:
    """Shards never committed, and committed shards whose error rows are redone."""

    pending: list[str]
    retry: dict[str, list[str]]
    plan: dict[str, Any]
    bases: dict[str, dict[str, int]] = field(default_factory=dict)  # `--redo` rows' earlier attempts (redo.py)

    def items(self) -> list[WorkItem]:
        return ([WorkItem(shard) for shard in self.pending]
                + [WorkItem(shard, keys, _bases(self.bases.get(shard), keys)) for shard, keys in self.retry.items()])


def _bases(bases: dict[str, int] | None, keys: list[str]) -> list[int] | None:
    return None if not bases else [bases.get(key, 0) for key in keys]


def unit_hash(unit: str) -> int:
    return int.from_bytes(hashlib.blake2b(unit.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class UnitSet:
    """A sorted set of 64-bit unit hashes: membership by binary search, 8 bytes a unit once built."""

    def __init__(self, hashes: array) -> None:
        self.values = np.unique(np.frombuffer(hashes, dtype=np.uint64)) if len(hashes) else np.empty(0, np.uint64)

    def __contains__(self, value: int) -> bool:
        index = int(np.searchsorted(self.values, np.uint64(value)))
        return index < len(self.values) and int(self.values[index]) == value

    def __len__(self) -> int:
        return len(self.values)

    def missing_from(self, other: UnitSet) -> int:
        """How many of our hashes `other` lacks."""
        return int(np.count_nonzero(~np.isin(self.values, other.values, assume_unique=True)))


def _planned_units(ledger: Ledger, input_uri: str) -> tuple[UnitSet, int]:
    """Hashes of every planned unit, and the index the next new shard gets."""
    hashes, last = array("Q"), -1
    for shard in ledger.planned_shards():
        hashes.extend(unit_hash(unit) for unit in shard.units(input_uri))
        last = max(last, int(shard.id))
    return UnitSet(hashes), last + 1


def _gone_examples(ledger: Ledger, input_uri: str, listed: UnitSet, most: int = 5) -> list[str]:
    examples: list[str] = []
    for shard in ledger.planned_shards():
        examples.extend(unit for unit in shard.units(input_uri) if unit_hash(unit) not in listed
                        and unit not in examples)
        if len(examples) >= most:
            return examples[:most]
    return examples


def grow_plan(ledger: Ledger, config: RunConfig, plan: dict[str, Any]) -> dict[str, Any]:
    """List the input again and plan what a finished run has not seen into new shards."""
    known, first_index = _planned_units(ledger, config.input.uri)
    listed = array("Q")

    def already_planned(unit: str) -> bool:
        value = unit_hash(unit)
        listed.append(value)
        return value in known

    new_shards = plan_shards(config.input, skip=already_planned, first_index=first_index)
    first = next(new_shards, None)
    if first is not None:
        plan = ledger.write_plan(_chain(first, new_shards), grown_from=plan)
        added = plan["grown"][-1]
        log.info("the input grew: %d new images in %d new shards", added["images_known"], added["shards"])
    else:
        log.info("the input has nothing new since the last run")
    now_listed = UnitSet(listed)
    gone = known.missing_from(now_listed)
    if gone:
        log.warning("%d files planned before are gone from the input (e.g. %s); their rows stay in the table",
                    gone, ", ".join(_gone_examples(ledger, config.input.uri, now_listed)))
    return plan


def _chain(first: Shard, rest: Iterator[Shard]) -> Iterator[Shard]:
    yield first
    yield from rest


def _retry_work(ledger: Ledger, config: RunConfig, markers: list[Marker]) -> dict[str, list[str]]:
    """The error rows of committed shards (`markers`, this config's) to redo; shards with nothing captioned
    are made pending again whole."""
    retry: dict[str, list[str]] = {}
    for marker in markers:
        if not marker.errors:
            continue
        if marker.errors >= marker.rows:
            # Nothing of it was captioned: redo it whole. This is also the only way back for a shard whose
            # one error row stands for the whole file (an unreadable tar or Parquet file, or one with no
            # images): once repaired, its images have keys that row never had.
            ledger.uncommit(marker.shard)
        else:
            retry[marker.shard] = error_keys(config.output.uri, config.output.storage_options, marker.shard,
                                             marker.part_file())
    return retry


def _judge_markers(ledger: Ledger, fingerprint: str) -> tuple[list[Marker], list[Marker]]:
    """(markers that count as committed, markers of another config's fingerprint). A marker of another
    fingerprint (a run that lost the output to this one and wrote late) is not done: its shard is redone
    and the pair replaced by the commit (run/commit.py); one of a shard this plan does not have is removed."""
    trusted, foreign = ledger.judge_markers(fingerprint)
    if not foreign:
        return trusted, []
    log.warning("%d shards have markers written under another config (fingerprint %s, e.g. shard %s): they do "
                "not count as committed and are redone", len(foreign), foreign[0].fingerprint, foreign[0].shard)
    planned = set(ledger.planned_ids())
    for marker in foreign:
        if marker.shard not in planned:
            ledger.uncommit(marker.shard)
    return trusted, [marker for marker in foreign if marker.shard in planned]


def prepare_output(ledger: Ledger, config: RunConfig, manifest: dict[str, Any], overwrite: bool = False,
                   retry_errors: bool = False, *, fingerprint: str | None = None,
                   redo: Selection | None = None) -> WorkList:
    """Check the fingerprint, plan, grow or reuse the plan, and list the work still to do.

    `fingerprint` is the config's, when the caller has it already (a run computes it once: RunMetadata).
    The caller holds the output's lease: nothing here runs beside another writer."""
    if overwrite:
        ledger.wipe()
    fingerprint = fingerprint or config.fingerprint()
    resuming = ledger.check_fingerprint(fingerprint)
    plan = ledger.plan_complete() if resuming else None
    if not resuming:
        ledger.write_manifest({"created_at": time.time(), **manifest})
    planned_before = plan is not None
    if plan is None:
        ledger.remove_plan()  # a plan cut short by a kill: plan again from the start
        plan = ledger.write_plan(plan_shards(config.input))
        log.info("planned %d shards (%d images known)", plan["shards"], plan["images_known"])
    trusted, foreign = _judge_markers(ledger, fingerprint)
    if planned_before and not set(ledger.planned_ids()) - {marker.shard for marker in trusted}:
        plan = grow_plan(ledger, config, plan)
    ledger.clear_staging()  # fragments of shards a killed run left uncommitted
    retry: dict[str, list[str]] = {}
    if retry_errors:
        retry = _retry_work(ledger, config, trusted)
        trusted = ledger.markers(fingerprint)  # less the shards made pending again whole
    bases: dict[str, dict[str, int]] = {}
    if redo:  # committed rows picked by `--redo`: retry work like error rows, their attempts numbered on
        chosen = redo_work(ledger, [mode.name for mode in config.modes], redo, fingerprint)
        for shard, keys in chosen.keys.items():
            retry[shard] = sorted(set(retry.get(shard, [])) | set(keys))
        bases = chosen.bases
        log.info("--redo: %d committed rows in %d shards to re-caption", chosen.rows, len(chosen.keys))
    committed = {marker.shard for marker in trusted}
    # A kill between part file and marker, or between a redone pair's marker and its old part's removal. The
    # part a marker of another config names stays until its shard's commit replaces the pair.
    ledger.remove_uncommitted_parts([*trusted, *foreign])
    pending = [shard for shard in ledger.planned_ids() if shard not in committed]
    log.info("%s: %d shards planned, %d committed, %d to do, %d committed with error (or --redo) rows to redo",
             "resuming" if resuming else "new run", plan["shards"], len(committed), len(pending), len(retry))
    return WorkList(pending, retry, plan, bases)
