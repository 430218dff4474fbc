"""Which column of a Parquet file holds the images, and which others travel into `meta`.

With `input.image_column` unset, the column is found in each file at read time, the same way every time
(the config keeps `None`, so its fingerprint never depends on what a file holds):
1. the first of `image`, `jpg`, `jpeg`, `png`, `webp` that holds bytes or a `{bytes, ...}` struct;
2. else the first struct column with a `bytes` field of bytes (Hugging Face datasets' Image feature);
3. else the first bytes column whose first non-null value, in one small batch of the first row group,
   starts with an image magic number.
No candidate is a `ValueError` naming the columns seen (with their types). An explicit column is taken as
given; that it holds bytes is checked by `check_image_column` (pipeline.io.layout.check_input).

Carried into `meta` (`columns`): every other column of a small scalar type (strings, numbers, bools, times),
at most `MAX_META_COLUMNS`; bytes, lists, maps and structs never are.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_COLUMN_NAMES = ("image", "jpg", "jpeg", "png", "webp")
SNIFF_ROWS = 8  # rows read to find a first non-null value when guessing by magic number
MAX_META_COLUMNS = 64
# Leading bytes of the image formats Pillow (and its plugins) read.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"\xff\x0a", b"\x00\x00\x00\x0cJXL ", b"\x00\x00\x01\x00")


def looks_like_image(data: bytes) -> bool:
    if data.startswith(_MAGIC):
        return True
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return data[4:8] == b"ftyp"  # AVIF, HEIF


def _is_bytes(kind: pa.DataType) -> bool:
    return (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind)
            or pa.types.is_binary_view(kind))


def is_image_struct(kind: pa.DataType) -> bool:
    return pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and _is_bytes(kind.field("bytes").type)


def holds_images(kind: pa.DataType) -> bool:
    """Bytes, or a `{bytes, ...}` struct: a column the reader can take images from."""
    return _is_bytes(kind) or is_image_struct(kind)


def describe_columns(schema: pa.Schema, most: int = 24) -> str:
    shown = [f"{item.name} ({item.type})" for item in list(schema)[:most]]
    return ", ".join(shown) + (f", ... ({len(schema.names)} in all)" if len(schema.names) > most else "") or "none"


def named_candidate(schema: pa.Schema) -> str | None:
    """Rules 1 and 2: the image column found from the schema alone, or None."""
    for name in IMAGE_COLUMN_NAMES:
        if name in schema.names and holds_images(schema.field(name).type):
            return name
    return next((item.name for item in schema if is_image_struct(item.type)), None)


def could_hold_images(schema: pa.Schema) -> bool:
    """Any column that rule 3 might pick: without one, the file is a table of metadata, never of images."""
    return any(holds_images(item.type) for item in schema)


def _first_value(parquet: pq.ParquetFile, column: str) -> bytes | None:
    if parquet.metadata.num_row_groups == 0:
        return None
    try:
        batch = next(parquet.iter_batches(batch_size=SNIFF_ROWS, row_groups=[0], columns=[column],
                                          use_threads=False), None)
    except Exception:  # a damaged file: the reader turns it into error rows later
        return None
    values = [] if batch is None else batch.column(0).to_pylist()
    return next((value for value in values if value), None)


def _sniffed(parquet: pq.ParquetFile, schema: pa.Schema) -> str | None:
    for item in schema:
        if _is_bytes(item.type):
            value = _first_value(parquet, item.name)
            if isinstance(value, bytes) and looks_like_image(value):
                return item.name
    return None


def guess_image_column(parquet: pq.ParquetFile) -> str:
    """The image column by the rules in the module doc; ValueError naming the columns when there is none."""
    schema = parquet.schema_arrow
    found = named_candidate(schema) or _sniffed(parquet, schema)
    if found is None:
        raise ValueError(f"no image column found (input.image_column is unset: looked for "
                         f"{', '.join(IMAGE_COLUMN_NAMES)}, a {{bytes, path}} struct, or bytes starting like an "
                         f"image); columns are {describe_columns(schema)}")
    return found


def image_column(parquet: pq.ParquetFile, explicit: str | None) -> str:
    """The column to read images from: `explicit` if it exists, else the guess; ValueError otherwise."""
    if explicit is None:
        return guess_image_column(parquet)
    names = parquet.schema_arrow.names
    if explicit not in names:
        raise ValueError(f"no column {explicit!r} (input.image_column); columns are {names}")
    return explicit


def check_image_column(parquet: pq.ParquetFile, explicit: str | None) -> str:
    """`image_column`, and the column must hold bytes or `{bytes, ...}` structs (the check before a run)."""
    found = image_column(parquet, explicit)
    kind = parquet.schema_arrow.field(found).type
    if not holds_images(kind):
        raise ValueError(f"column {found!r} (input.image_column) holds {kind}, not image bytes or a "
                         f"{{bytes, path}} struct; columns are {describe_columns(parquet.schema_arrow)}")
    return found


def _small_scalar(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
            or pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)
            or pa.types.is_decimal(kind) or pa.types.is_temporal(kind))


def meta_columns(schema: pa.Schema, image: str) -> list[str]:
    """The columns carried into `meta`, in schema order (module doc)."""
    carried: Iterable[str] = (item.name for item in schema if item.name != image and _small_scalar(item.type))
    return list(carried)[:MAX_META_COLUMNS]
