"""The Ray Data stages around the caption actors: read + decode + prepare a shard, and write fragments.

    read_and_prepare   [CPU tasks, generator UDF]: shard ids in, prepared image rows out, a bounded batch
                       at a time; every record of the shard becomes exactly one row (an image or an error)
    write_stage        [CPU tasks]: captioned rows out to `_staging/<shard>/<run>/` fragments, and a report
                       of which keys each fragment holds for the committer; a mode's clean-up (cleanup.py)
                       is applied here, off the caption actor's hot loop
Both take the run's id (its lease's holder id) in their fn_kwargs: what they write in staging is that run's,
and only that run's commits read it (table/fragments.py).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from pipeline.captioning import cleanup
from pipeline.captioning.images import prepare_image
from pipeline.captioning.modes import ResolvedMode
from pipeline.config import RunConfig
from pipeline.engine.options import ENGINE_COLUMN
from pipeline.io.content import content_hash
from pipeline.io.fs import read_bytes, retrying
from pipeline.io.sources import Shard, read_shard
from pipeline.run.records import WorkItem
from pipeline.table.fragments import write_expected, write_fragments
from pipeline.table.ledger import Ledger
from pipeline.table.records import WriteReport
from pipeline.table.schema import read_schema, to_table

READ_BATCH = 16  # prepared images per block leaving a read task (~7 MB)


def _records_as_rows(shard: Shard, config: RunConfig, only: list[str] | None,
                     bases: dict[str, int] | None = None) -> Iterator[dict[str, Any]]:
    _size, records = read_shard(shard, config.input)
    wanted = set(only) if only is not None else None  # re-captioning a committed shard's error rows
    modes = tuple(config.resolved_modes()) if config.compute.dedup else ()
    for record in records:
        if wanted is not None and record.key not in wanted:
            continue
        row = {"key": record.key, "source": record.source, "member": record.member, "shard": shard.id,
               "meta": record.meta}
        if record.error is None:
            prepared = prepare_image(record.data, record.member or record.key, config.input.max_pixels)
            row.update(width=prepared.width, height=prepared.height, format=prepared.format,
                       pixels=prepared.pixels, error=prepared.error)
            if prepared.error is None and config.compute.dedup:  # the run-wide dedup key (pipeline.engine.dedup)
                row["content_hash"] = dedup_key(content_hash(record.data, record.meta), modes, config.seed,
                                                record.key, record.meta)
        else:
            row["error"] = record.error
        row["status"] = "ok" if row.get("error") is None else "error"
        if bases:  # a row redone by `run --redo`: its attempts continue after the ones it had
            row["attempt_base"] = bases.get(record.key, 0)
        yield row


def dedup_key(content: str, modes: tuple[ResolvedMode, ...], run_seed: int, key: str, meta: Any) -> str:
    """What makes two rows the same work: the same image AND the same instruction in every mode. A prompt
    set draws per key and template fields fill from the row (`{meta.caption}`, `{folder}`), so two copies of
    one image may be asked different things; they are captioned apart then, never given each other's text."""
    if all(len(mode.instructions) == 1 and "{" not in mode.instructions[0] for mode in modes):
        return content  # one fixed instruction per mode: the image alone decides
    instructions = [mode.instruction_for_row(run_seed, key, meta)[0] for mode in modes]
    return hashlib.sha256("\x1e".join([content, *instructions]).encode()).hexdigest()


def _rows_of(shard: Shard, config: RunConfig, only: list[str] | None = None,
             bases: dict[str, int] | None = None, run_id: str | None = None) -> Iterator[dict[str, Any]]:
    """A shard's rows; the last one carries `shard_size`, the count of rows (and keys) the shard yielded.

    The count is known only at the end (a tar is read in one pass), so every row is held back until the
    next one arrives, and before the last one leaves, the shard's keys are recorded in staging for the
    commit to check against (sink.merge_shard)."""
    keys: list[str] = []
    previous: dict[str, Any] | None = None
    for row in _records_as_rows(shard, config, only, bases):
        if previous is not None:
            yield previous
        keys.append(row["key"])
        previous = row
    if previous is None:
        previous = {"key": shard.id, "source": shard.uri, "shard": shard.id, "status": "error",
                    "error": "no images in this shard"}
        keys = [shard.id]
    write_expected(config.output.uri, config.output.storage_options, shard.id, keys, run_id)
    previous["shard_size"] = len(keys)
    yield previous


def read_and_prepare(batch: pa.Table, config_json: str, output_uri: str,
                     run_id: str | None = None) -> Iterator[pa.Table]:
    """Generator UDF: work items (`WorkItem.to_row` rows) in, prepared image rows out, a small batch at a time;
    the keys of each shard are recorded in run `run_id`'s staging."""
    config = RunConfig.model_validate_json(config_json)
    ledger = Ledger(output_uri, config.output.storage_options)
    schema = read_schema()
    for item in map(WorkItem.from_row, batch.to_pylist()):
        shard = Shard.from_json(retrying(read_bytes, ledger.fs, ledger.plan_path(item.shard)).decode())
        chunk: list[dict[str, Any]] = []
        bases = dict(zip(item.only, item.bases, strict=True)) if item.only and item.bases else None
        for row in _rows_of(shard, config, item.only, bases, run_id):
            chunk.append(row)
            if len(chunk) == READ_BATCH:
                yield _rows_to_table(chunk, schema)
                chunk = []
        if chunk:
            yield _rows_to_table(chunk, schema)


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return to_table({name: [row.get(name) for row in rows] for name in schema.names}, schema)


@functools.lru_cache(maxsize=8)
def _modes_to_clean(config_json: str) -> tuple[ResolvedMode, ...]:
    """The modes with a clean-up, parsed once per worker process and config (not once per batch)."""
    return tuple(mode for mode in RunConfig.model_validate_json(config_json).resolved_modes()
                 if mode.cleanup is not None)


def clean_captions(batch: pa.Table, modes: tuple[ResolvedMode, ...]) -> pa.Table:
    """Each mode's column cleaned, and the model's text in `<mode>_raw` (added if the batch lacks it)."""
    for mode in modes:
        if mode.cleanup is None or mode.name not in batch.column_names:
            continue
        cleaned, raw = cleanup.clean_column(batch.column(mode.name).to_pylist(), mode.prepend, mode.append,
                                            mode.cleanup)
        batch = batch.set_column(batch.column_names.index(mode.name), pa.field(mode.name, pa.string()),
                                 pa.array(cleaned, pa.string()))
        raw_field = pa.field(f"{mode.name}_raw", pa.string())
        if raw_field.name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(raw_field.name), raw_field, pa.array(raw, pa.string()))
        else:
            batch = batch.append_column(raw_field, pa.array(raw, pa.string()))
    return batch


def write_stage(batch: pa.Table, output_uri: str, storage_options: dict[str, Any],
                config_json: str | None = None, run_id: str | None = None) -> pa.Table:
    """Clean captions where a mode asks for it (needs `config_json`, the run's config), write the fragments in
    run `run_id`'s staging, and report their keys to the committer: one `WriteReport` row per shard (the
    driver reads them back with `WriteReport.from_row`)."""
    if config_json is not None:
        batch = clean_captions(batch, _modes_to_clean(config_json))
    engines = None  # the caption actors that made the batch (engine/options.py): for the report, not the table
    if ENGINE_COLUMN in batch.column_names:
        engines = sorted({engine for engine in batch.column(ENGINE_COLUMN).to_pylist() if engine})
        batch = batch.drop_columns([ENGINE_COLUMN])
    reports = [WriteReport.from_row(row) for row in write_fragments(batch, output_uri, storage_options, run_id)]
    table = WriteReport.to_table(reports)
    if engines is not None:
        table = table.append_column(pa.field(ENGINE_COLUMN, pa.list_(pa.string())), pa.array(
            [engines] * table.num_rows, pa.list_(pa.string())))
    return table
