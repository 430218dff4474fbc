"""JSON Lines: one object per committed row, every column, UTF-8 (for tools that do not read Parquet).

Streamed: rows go out a batch at a time into a temporary file beside the target, renamed over it at
the end (one upload on object stores), so readers never see a half-written export. A target
ending in `.gz`, `.bz2`, `.xz` or `.zst` is compressed accordingly.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

from fsspec.utils import infer_compression

from pipeline.exports.table import iter_batches, open_output
from pipeline.io.fs import is_local, open_fs


def export_jsonl(output_uri: str, target_file: str, storage_options: dict[str, Any] | None = None) -> int:
    """Write every committed row as one JSON object per line; return the number of rows."""
    output = open_output(output_uri, storage_options)
    fs, path = open_fs(target_file, storage_options)
    directory, name = posixpath.split(path)
    # Local: write beside the target and rename. Object stores: the upload happens on close, whole.
    temporary = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}-{name}") if is_local(fs) else path
    if is_local(fs) and directory:
        fs.makedirs(directory, exist_ok=True)
    rows = 0
    try:
        with fs.open(temporary, "wb", compression=infer_compression(name)) as handle:
            for batch in iter_batches(output):
                lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in batch.to_pylist()]
                handle.write("".join(lines).encode("utf-8"))
                rows += len(lines)
        if temporary != path:
            fs.mv(temporary, path)
    finally:
        if temporary != path and fs.exists(temporary):
            fs.rm(temporary)
    return rows
