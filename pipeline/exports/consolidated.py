"""The table trainers load: Parquet files of a target size (`train-00000.parquet`, ...), captions and image bytes.

    DIR/train-00000.parquet   key, [image], text, captions, <mode>..., width, height, [--columns ...]
    DIR/train-00001.parquet   ...
    DIR/_export_state.json    what a re-run needs to resume (rolling.py)

`datasets.load_dataset("parquet", data_dir=DIR, split="train")` (or `data_files=DIR/train-*.parquet`) loads
them: `train-*` is Hugging Face's default pattern of the train split. Columns:
- `key`, and one column per chosen mode (`--modes`, default all in run order) holding its caption;
- `text`: the first chosen mode's caption (the column diffusers' text-to-image scripts read by default);
- `captions`: the chosen modes' non-empty captions as a list of strings, for trainers that pick one at random;
- `width`, `height`; any other table column asked for (`meta`, `tags_prompt`, ...), with the table's type;
- with images, `image`: Hugging Face's Image feature, a struct of the image's `bytes` (as they came from the
  input, read again by sources.py) and a `path` (its name), declared in the schema's `huggingface` metadata so
  `datasets` decodes it to a PIL image.
Only ok rows go out (error rows are counted as skipped; with images, rows whose image cannot be read again
are counted as missing). A row group holds about a sixteenth of the target size (at most 64 MiB, 10,000 rows):
the one row group in memory at any time.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.exports.names import image_extension
from pipeline.exports.rolling import Layout, RollingCounts, describe, export_rolling, parse_size
from pipeline.exports.sources import input_access
from pipeline.exports.stream import Item
from pipeline.exports.table import Output, check_modes, open_output
from pipeline.table.schema import output_schema

DEFAULT_TARGET_SIZE = "256MB"
ROW_GROUP_SHARE = 16  # a row group holds about target / 16
MAX_ROW_GROUP_BYTES = 64 * 2**20
MAX_ROW_GROUP_ROWS = 10_000
BATCH_ROWS = 256  # rows held as Python objects before they become an Arrow batch of the row group
FIXED = ("key", "image", "text", "captions", "width", "height")  # columns every export has (image: with images)
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage
# Arrow types -> `datasets.Value` dtypes, for the `huggingface` schema metadata (other types are inferred).
_DTYPES = {pa.string(): "string", pa.large_string(): "large_string", pa.int8(): "int8", pa.int16(): "int16",
           pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32", pa.float64(): "float64",
           pa.bool_(): "bool", pa.binary(): "binary"}


def file_name(number: int) -> str:
    return f"train-{number:05d}.parquet"


def table_schema(output: Output) -> pa.Schema:
    """The committed table's schema: its first part file's, else the one a run of its modes writes."""
    fs = output.ledger.fs
    for shard in output.shards:
        try:
            with fs.open(output.part_path(shard), "rb") as handle:
                return pq.read_schema(handle)
        except FileNotFoundError:
            continue
    return output_schema(output.mode_names)


def check_columns(output: Output, modes: list[str], columns: list[str] | None) -> list[str]:
    """The extra table columns asked for, in order, without those the export has anyway; an unknown one or a
    mode whose name the export takes fails in one line naming it."""
    clashing = [mode for mode in modes if mode in FIXED]
    if clashing:
        raise ValueError(f"modes {clashing} cannot be columns of the parquet export, which has its own "
                         f"{', '.join(FIXED)}; leave them out with --modes")
    known = table_schema(output).names
    extra: list[str] = []
    for name in columns or []:
        if name not in known:
            raise ValueError(f"unknown column {name!r} for --columns; this table has {', '.join(known)}")
        if name not in ("key", "width", "height", *modes, *extra):
            extra.append(name)
    return extra


def export_schema(modes: list[str], extra: list[str], table: pa.Schema, with_images: bool) -> pa.Schema:
    """The files' schema, with the `huggingface` metadata that makes `datasets` decode `image`."""
    fields = [pa.field("key", pa.string(), nullable=False)]
    if with_images:
        fields.append(pa.field("image", IMAGE_TYPE))
    fields += [pa.field("text", pa.string()), pa.field("captions", pa.list_(pa.string()))]
    fields += [pa.field(mode, pa.string()) for mode in modes]
    fields += [pa.field("width", pa.int32()), pa.field("height", pa.int32())]
    fields += [pa.field(name, table.field(name).type) for name in extra]
    features: dict[str, Any] = {}
    for item in fields:
        if item.name == "image":
            features["image"] = {"_type": "Image"}
        elif item.name == "captions":
            # "Sequence": the name every datasets version reads (4.x and later read it as a List).
            features["captions"] = {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}
        elif item.type in _DTYPES:
            features[item.name] = {"dtype": _DTYPES[item.type], "_type": "Value"}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def image_path(row: dict[str, Any]) -> str:
    """The `path` stored beside the image bytes: the key's last part with the image's extension."""
    name = posixpath.basename(str(row["key"]).replace("\\", "/")) or "image"
    extension = image_extension(row)
    return name if name.lower().endswith(extension.lower()) else name + extension


class ParquetPart:
    """One `train-NNNNN.parquet` being written: rows gather in a row group, written out when it is full."""

    def __init__(self, path: str, schema: pa.Schema, modes: list[str], extra: list[str],
                 row_group_bytes: int) -> None:
        self.schema, self.modes, self.extra, self.row_group_bytes = schema, modes, extra, row_group_bytes
        self.with_images = "image" in schema.names
        self.sink = pa.OSFile(path, "wb")
        self.writer = pq.ParquetWriter(
            self.sink, schema,
            use_dictionary=[name for name in schema.names if name not in ("image", "key")],
            write_statistics=[name for name in schema.names if name != "image"])
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}  # rows not in a batch yet
        self.batches: list[pa.RecordBatch] = []  # the row group so far, as Arrow data
        self.rows = 0
        self.held = 0

    def add(self, item: Item, index: int) -> None:
        row = item.row
        captions = [row.get(mode) for mode in self.modes]
        values = {"key": row["key"], "text": captions[0], "captions": [text for text in captions if text],
                  "width": row.get("width"), "height": row.get("height"),
                  **dict(zip(self.modes, captions, strict=True)), **{name: row.get(name) for name in self.extra}}
        if self.with_images:
            values["image"] = {"bytes": item.data, "path": image_path(row)}
        for name, column in self.columns.items():
            column.append(values[name])
        self.rows += 1
        self.held += row_size(item, self.modes, self.extra)
        if len(self.columns["key"]) >= BATCH_ROWS:
            self._batch()
        if self.held >= self.row_group_bytes or self.rows >= MAX_ROW_GROUP_ROWS:
            self.flush()

    def _batch(self) -> None:
        """Move the rows held as Python objects into an Arrow batch (a few times smaller for small rows)."""
        if self.columns["key"]:
            self.batches.append(pa.RecordBatch.from_pydict(self.columns, schema=self.schema))
            self.columns = {name: [] for name in self.schema.names}

    def written(self) -> int:
        return self.sink.tell()

    def buffered(self) -> int:
        return self.held

    def flush(self) -> None:
        self._batch()
        if self.batches:
            self.writer.write_table(pa.Table.from_batches(self.batches, schema=self.schema), row_group_size=self.rows)
            self.batches, self.rows, self.held = [], 0, 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.sink.close()

    def abort(self) -> None:
        self.columns, self.batches = {name: [] for name in self.schema.names}, []
        with contextlib.suppress(Exception):  # a footer to a file about to be removed: only to close cleanly
            self.writer.close()
        self.sink.close()


def row_size(item: Item, modes: list[str], extra: list[str]) -> int:
    """About the bytes a row takes in a file: its image, its captions twice (own column, `captions`) and `text`."""
    row = item.row
    texts = sum(len(str(row.get(mode) or "")) for mode in modes) * 2 + len(str(row.get(modes[0]) or ""))
    return len(item.data or b"") + texts + sum(len(str(row.get(name) or "")) for name in extra) + 48 \
        + len(str(row["key"]))


def export_parquet(output_uri: str, target_dir: str, modes: list[str] | None = None,
                   storage_options: dict[str, Any] | None = None, *, columns: list[str] | None = None,
                   with_images: bool = False, target_size: str | int = DEFAULT_TARGET_SIZE,
                   input_storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> RollingCounts:
    """Write (or resume) the consolidated Parquet export of every committed ok row into the local folder
    `target_dir`. Images are read with `input_storage_options` (else the manifest's, else the output's)."""
    output = open_output(output_uri, storage_options)
    modes = check_modes(output, modes)
    extra = check_columns(output, modes, columns)
    size = parse_size(target_size)
    access = input_access(output, input_storage_options, storage_options) if with_images else None
    schema = export_schema(modes, extra, table_schema(output), with_images)
    row_group_bytes = max(1, min(MAX_ROW_GROUP_BYTES, size // ROW_GROUP_SHARE))

    def open_part(path: str) -> ParquetPart:
        return ParquetPart(path, schema, modes, extra, row_group_bytes)

    def item_size(item: Item) -> int:
        return row_size(item, modes, extra)

    layout = Layout("parquet", file_name, open_part, item_size)
    options = {"modes": modes, "columns": extra, "with_images": with_images}
    read = sorted({"key", "status", "source", "member", "format", "width", "height", *modes, *extra})
    return export_rolling(output, target_dir, layout, options, size, read, access, overwrite)


def describe_parquet(counts: RollingCounts, target_dir: str) -> str:
    return (describe(counts, target_dir, "parquet files") +
            f"\nload it with datasets.load_dataset(\"parquet\", data_dir={target_dir!r}, split=\"train\")")

