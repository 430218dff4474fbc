"""Parquet files with an image column (bytes, or Hugging Face's `{bytes, path}` struct).

- The image column is `input.image_column`, or, when that is unset, found in each file by the rules of
  pipeline.io.columns (the same file always gives the same column).
- Planning reads each file's footer and cuts the file into shards of consecutive row groups of at most
  about `shard_size` rows (at least one row group each: a row group bigger than that is one shard).
  A file whose footer cannot be read, or that lacks the image column (or, unset, any column that could
  hold images), is one shard that reads as one error row keyed by the file's key prefix.
- Reading goes row group by row group, `READ_BATCH_ROWS` rows at a time: the image column and the small
  scalar columns that travel into `meta` (pipeline.io.meta). A row group that fails to decode gives one
  error row per row it still owed (its row count is in the footer); when only the carried columns are
  damaged, its images are read again without them. The other groups are read.
- img2dataset's Parquet output keeps the URLs it failed to download as rows without image bytes: a row
  whose `status` is not `success` (with an `error_message` column beside it) is an error row giving both.
- Keys are `<prefix>/<row in the file, 8 digits>`, whichever shard the row falls in.
- Transient storage errors are retried beneath pyarrow (`RetryingReader`); when they persist,
  `TransientStorageError` escapes: the read task fails and Ray retries it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io.columns import could_hold_images, describe_columns, image_column, meta_columns
from pipeline.io.fs import RetryingReader, TransientStorageError, open_fs
from pipeline.io.keys import container_prefix
from pipeline.io.meta import column_value, row_meta
from pipeline.io.shards import Reading, Record, Shard, describe

READ_BATCH_ROWS = 64  # rows decoded at a time within a row group


def _row_counts(parquet: pq.ParquetFile, file_size: int) -> list[int]:
    """Rows of each row group, checked: a damaged footer can claim any count (negative, or billions), and
    every claimed row becomes a record. More than 8 rows a byte (1 bit a row) beyond a million is damage.

    Never `RowGroupMetaData.column()`: on some damaged footers pyarrow (26) aborts the process there."""
    metadata = parquet.metadata
    counts = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
    if any(count < 0 for count in counts) or sum(counts) != metadata.num_rows:
        raise ValueError(f"damaged footer: {metadata.num_rows} rows in all, row groups of {counts[:10]} ...")
    if sum(counts) > max(1_000_000, 8 * file_size):
        raise ValueError(f"damaged footer: {sum(counts)} rows claimed in a file of {file_size} bytes")
    return counts


@dataclass
class _Opened:
    handle: RetryingReader
    parquet: pq.ParquetFile
    counts: list[int]
    image: str = ""  # the image column
    carried: tuple[str, ...] = ()  # the columns that go into meta


def _plannable(parquet: pq.ParquetFile, column: str | None) -> None:
    """Raise unless the file can be read with `column` (or, unset, has a column that could hold images)."""
    schema = parquet.schema_arrow
    if column is not None and column not in schema.names:
        raise ValueError(f"no column {column!r} (input.image_column); columns are {schema.names}")
    if column is None and not could_hold_images(schema):
        raise ValueError(f"no column could hold images; columns are {describe_columns(schema)}")


def _open(fs: fsspec.AbstractFileSystem, path: str, column: str | None, resolve: bool = True) -> _Opened:
    """The open file, its reader and row counts; with `resolve`, also its image and carried columns.
    Raises if it cannot be read with `column`. Planning does not resolve: a guess may read a batch."""
    handle = RetryingReader(fs, path)
    try:
        parquet = pq.ParquetFile(handle)
        _plannable(parquet, column)
        opened = _Opened(handle, parquet, _row_counts(parquet, handle.seek(0, io.SEEK_END)))
        if resolve:
            opened.image = image_column(parquet, column)
            opened.carried = tuple(meta_columns(parquet.schema_arrow, opened.image))
    except BaseException:
        handle.close()
        raise
    return opened


def footer_rows(fs: fsspec.AbstractFileSystem, path: str, column: str | None) -> list[int] | None:
    """Rows of each row group, or None when the file cannot be read as Parquet with `column`."""
    try:
        opened = _open(fs, path, column, resolve=False)
    except TransientStorageError:
        raise
    except Exception:  # damaged bytes make parsers raise anything; the reader gives the reason later
        return None
    opened.handle.close()
    return opened.counts


def row_group_ranges(rows: list[int] | None, target: int) -> Iterator[tuple[list[int] | None, int, int]]:
    """(row_groups [start, stop), first row, row count) of each shard of a file; (None, 0, 1) if unreadable."""
    if rows is None:
        yield None, 0, 1
        return
    start, first, count = 0, 0, 0
    for index, size in enumerate(rows):
        if count and count + size > target:
            yield [start, index], first, count
            start, first, count = index, first + count, 0
        count += size
    yield [start, len(rows)], first, count  # an empty file is one empty shard


def _image_bytes(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        return value.get("bytes"), value.get("path")
    return value, None


def _failed_download(columns: dict[str, Any]) -> str | None:
    """img2dataset's reason for a row it could not download, or None (also for other datasets' rows)."""
    status = columns.get("status")
    if "error_message" not in columns or not isinstance(status, str) or status == "success":
        return None
    return f"img2dataset {status}: {columns.get('error_message') or 'no error message'}"


def _row_record(shard: Shard, prefix: str, row: int, value: Any, columns: dict[str, Any]) -> Record:
    data, inner_path = _image_bytes(value)
    member = inner_path if isinstance(inner_path, str) and inner_path else str(row)
    key, meta = f"{prefix}/{row:08d}", row_meta(columns)
    failed = _failed_download(columns)
    if failed is not None:
        return Record(key, shard.uri, member, None, failed, meta)
    if not data:
        return Record(key, shard.uri, member, None, "no image bytes in this row", meta)
    if not isinstance(data, bytes):
        return Record(key, shard.uri, member, None, f"the image column holds {type(data).__name__}, not bytes", meta)
    return Record(key, shard.uri, member, data, None, meta)


def _batches(opened: _Opened, index: int, columns: list[str], skip: int) -> Iterator[tuple[Any, dict[str, Any]]]:
    """(image value, carried columns) of row group `index`'s rows after the first `skip`."""
    batches = opened.parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[index], columns=columns,
                                          use_threads=False)
    for batch in batches:
        values = [batch.column(position).to_pylist() for position in range(len(columns))]
        for number, image in enumerate(values[0]):
            if skip > 0:
                skip -= 1
                continue
            yield image, {name: column_value(values[position][number])
                          for position, name in enumerate(columns[1:], start=1)}


def _row_group(opened: _Opened, index: int, first_row: int, shard: Shard, prefix: str) -> Iterator[Record]:
    rows, done = opened.counts[index], 0
    reason = f"row group {index} ended before its {rows} rows"
    # With carried columns first; if they cannot be decoded, the images again without them.
    attempts = [[opened.image, *opened.carried], [opened.image]] if opened.carried else [[opened.image]]
    for columns in attempts:
        try:
            for value, carried in _batches(opened, index, columns, done):
                if done == rows:
                    break
                yield _row_record(shard, prefix, first_row + done, value, carried)
                done += 1
            break
        except TransientStorageError:
            raise
        except Exception as err:  # a corrupt page, chunk or header: whatever the decoder raises
            reason = f"unreadable row group {index}: {describe(err)}"
    for row in range(first_row + done, first_row + rows):
        yield Record(f"{prefix}/{row:08d}", shard.uri, str(row), None, reason)


def _groups(opened: _Opened, shard: Shard, prefix: str, groups: range, first_row: int) -> Iterator[Record]:
    row = first_row
    for index in groups:
        yield from _row_group(opened, index, row, shard, prefix)
        row += opened.counts[index]


def _planned_range(shard: Shard, config: InputConfig) -> Iterator[Record]:
    """The rows the plan gave this shard, exactly `shard.size` of them, whatever the file holds now."""
    fs, path = open_fs(shard.uri, config.storage_options)
    prefix = container_prefix(shard.container, path)
    start, stop = shard.row_groups or (0, 0)
    size = shard.size or 0
    try:
        opened = _open(fs, path, config.image_column)
    except TransientStorageError:
        raise
    except Exception as err:
        reason = f"unreadable object: {describe(err)}"
    else:
        with opened.handle:
            if stop <= len(opened.counts) and sum(opened.counts[start:stop]) == size:
                yield from _groups(opened, shard, prefix, range(start, stop), shard.first_row)
                return
        reason = "the file changed since it was planned (its row groups differ)"
    for row in range(shard.first_row, shard.first_row + size):
        yield Record(f"{prefix}/{row:08d}", shard.uri, str(row), None, reason)


def _whole_file(shard: Shard, config: InputConfig) -> Reading:
    fs, path = open_fs(shard.uri, config.storage_options)
    prefix = container_prefix(shard.container, path)
    try:
        opened = _open(fs, path, config.image_column)
    except TransientStorageError:
        raise
    except Exception as err:  # the footer or schema: the whole file is one error row
        return 1, iter([Record(prefix, shard.uri, None, None, f"unreadable object: {describe(err)}")])

    def records() -> Iterator[Record]:
        with opened.handle:
            yield from _groups(opened, shard, prefix, range(len(opened.counts)), 0)

    return sum(opened.counts), records()


def read_parquet(shard: Shard, config: InputConfig) -> Reading:
    """A Parquet shard's rows: its planned row groups, or (plans without them) the whole file."""
    if shard.row_groups is None:
        return _whole_file(shard, config)
    return shard.size or 0, _planned_range(shard, config)
