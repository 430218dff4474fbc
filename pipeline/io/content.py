"""An image's content hash: what makes two keys the same image for the run's de-duplication.

The hash is the lowercase hex SHA-256 of the image's bytes. When the dataset already recorded it (img2dataset
writes each image's `sha256` into its metadata, carried in the row's `meta` JSON, pipeline.io.meta), that value
is taken as is and the bytes are not hashed again: it is the SHA-256 of the same stored bytes, so a record with
the field and one without still match when their bytes are equal. The read stage (pipeline.run.stages) decides
it, before the engine; the caption actors only compare hashes (pipeline.engine.dedup).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def recorded_sha256(meta: str | dict[str, Any] | None) -> str | None:
    """The `sha256` the dataset recorded for the image (its `meta`, as JSON text or parsed), if a valid one."""
    if isinstance(meta, str):
        if '"sha256"' not in meta:  # most rows: skip parsing
            return None
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    value = meta.get("sha256") if isinstance(meta, dict) else None
    if isinstance(value, str) and _HEX64.fullmatch(value.strip()):
        return value.strip().lower()
    return None


def content_hash(data: bytes | None, meta: str | dict[str, Any] | None = None) -> str | None:
    """The image's content hash (module doc): the recorded `sha256` when present, else the bytes' SHA-256;
    None when there are no bytes and nothing recorded."""
    recorded = recorded_sha256(meta)
    if recorded is not None:
        return recorded
    if data is None:
        return None
    return hashlib.sha256(data).hexdigest()
