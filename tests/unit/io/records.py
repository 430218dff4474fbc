"""Helpers shared by the reader tests: every record of an input, and a record's meta as a dict."""

from __future__ import annotations

import json

from pipeline.config import InputConfig
from pipeline.io.sources import Record, plan_shards, read_shard


def all_records(config: InputConfig) -> list[Record]:
    """Plan the input and read every shard; keys must be unique across the input."""
    records = [record for shard in plan_shards(config) for record in read_shard(shard, config)[1]]
    assert len({record.key for record in records}) == len(records)
    return records


def meta_of(record: Record) -> dict[str, object]:
    return json.loads(record.meta) if record.meta else {}
