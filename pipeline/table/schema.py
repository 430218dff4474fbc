"""The output table's schema: the Arrow types of the columns named in `pipeline.captioning.columns`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.captioning.columns import BASE_COLUMNS, IN_FLIGHT_COLUMNS, MODE_SUFFIXES

METADATA_KEY = b"joycaption_pipeline"

_INT32, _STRING = pa.int32(), pa.string()
_BASE_TYPES: dict[str, pa.DataType] = {"width": _INT32, "height": _INT32}
_REQUIRED = frozenset({"key", "shard", "status"})
_IN_FLIGHT_TYPES: dict[str, pa.DataType] = {"shard_size": pa.int64(), "pixels": pa.binary(), "attempt_base": _INT32,
                                            "content_hash": _STRING}
_MODE_TYPES: dict[str, pa.DataType] = {"_tokens": _INT32, "_attempts": _INT32, "_seed": pa.int64(),
                                       "_confidence": pa.float32()}

BASE_FIELDS = [pa.field(name, _BASE_TYPES.get(name, _STRING), nullable=name not in _REQUIRED) for name in BASE_COLUMNS]
MODE_TYPES: dict[str, pa.DataType] = {suffix: _MODE_TYPES.get(suffix, _STRING) for suffix in MODE_SUFFIXES}


def output_schema(mode_names: list[str]) -> pa.Schema:
    fields = list(BASE_FIELDS)
    for name in mode_names:
        fields.extend(pa.field(name + suffix, kind) for suffix, kind in MODE_TYPES.items())
    return pa.schema(fields)


def read_schema() -> pa.Schema:
    """Rows leaving the read stage: the base columns, the shard's size and the prepared pixels."""
    return pa.schema([*BASE_FIELDS, *(pa.field(name, _IN_FLIGHT_TYPES[name]) for name in IN_FLIGHT_COLUMNS)])


def in_flight_schema(mode_names: list[str]) -> pa.Schema:
    """The output schema plus what the committer needs while a shard is in flight."""
    return output_schema(mode_names).append(pa.field("shard_size", _IN_FLIGHT_TYPES["shard_size"]))


def to_table(columns: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """Build a table in the output schema from column lists or arrays (missing columns are null)."""
    length = len(columns["key"])
    arrays = []
    for field in schema:
        values = columns.get(field.name)
        if values is None:
            arrays.append(pa.nulls(length, field.type))
        else:
            arrays.append(pa.array(list(values), type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)
