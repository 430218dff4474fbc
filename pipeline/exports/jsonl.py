"""JSON Lines: one object per committed row, every column, UTF-8 (for tools that do not read Parquet).

`--to` is the one file to write: a folder is refused in words, and an existing file is kept unless
`overwrite` (targets.py). Streamed: rows go out a batch at a time into a temporary file beside the target,
moved into place at the end (uploaded once, whole, to object stores), so readers never see a half-written export.
A target ending in `.gz`, `.bz2`, `.xz` or `.zst` is compressed accordingly.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

import fsspec
from fsspec.utils import infer_compression

from pipeline.exports.table import iter_batches, open_output
from pipeline.exports.targets import check_file_target, new_file
from pipeline.io.fs import open_fs


def export_jsonl(output_uri: str, target_file: str, storage_options: dict[str, Any] | None = None, *,
                 overwrite: bool = False) -> int:
    """Write every committed row as one JSON object per line; return the number of rows."""
    output = open_output(output_uri, storage_options)
    fs, path = open_fs(target_file, storage_options)
    check_file_target(target_file, fs, path, "jsonl export", "captions.jsonl", overwrite)
    rows = 0
    with new_file(fs, path, overwrite) as temporary, \
            fsspec.open(temporary, "wb", compression=infer_compression(posixpath.basename(path))) as handle:
        for batch in iter_batches(output):
            lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist()]
            handle.write("".join(lines).encode("utf-8"))
            rows += len(lines)
    return rows
