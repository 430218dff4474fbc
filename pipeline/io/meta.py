"""What a dataset already knows about an image, carried into the row's `meta` JSON string.

Stable names come first, taken from whatever the source has (img2dataset's schema, which most scrapes
follow: LAION, DataComp, COYO):

| meta name | from |
| --- | --- |
| `caption` | the `.txt` sidecar or member; else a `caption` (or `text`) field of the `.json` or column |
| `url`, `sha256`, `width`, `height`, `original_width`, `original_height` | the field or column of that name |
| `source_key` | the source's own `key` (img2dataset's sample key) |

Then the raw material, as read: `json` and `txt` (WebDataset members, or sidecars beside an image file),
or `columns` (a Parquet row's other small scalar columns, pipeline.io.columns). A name the source lacks
is left out; a row with nothing to carry has `meta` null.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
from collections.abc import Mapping
from typing import Any

MAX_TEXT_BYTES = 4096  # a longer string column is cut to this many UTF-8 bytes
STABLE_FIELDS = (("url", "url"), ("key", "source_key"), ("sha256", "sha256"), ("width", "width"),
                 ("height", "height"), ("original_width", "original_width"), ("original_height", "original_height"))
CAPTION_FIELDS = ("caption", "text")
STABLE_NAMES = ("caption", *(name for _field, name in STABLE_FIELDS))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def stable_fields(fields: Mapping[str, Any] | None, txt: str | None = None) -> dict[str, Any]:
    """The stable names (module doc) found in `fields` (a `.json` object or a row's columns) and `txt`."""
    fields = fields if isinstance(fields, Mapping) else {}
    out: dict[str, Any] = {}
    caption = txt if isinstance(txt, str) else next(
        (fields[name] for name in CAPTION_FIELDS if isinstance(fields.get(name), str)), None)
    if caption is not None:
        out["caption"] = caption
    for source, name in STABLE_FIELDS:
        value = fields.get(source)
        if value is not None and _scalar(value):
            out[name] = value
    return out


def meta_json(meta: Mapping[str, Any]) -> str | None:
    """`meta` as a JSON string, None when empty. Lone surrogates (from `\\ud800`-style escapes) stay escaped."""
    if not meta:
        return None
    text = json.dumps(meta, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(meta)
    return text


def sidecar_value(extension: str, data: bytes) -> Any:
    """A `.json` member or sidecar parsed (kept as text if it does not parse), a `.txt` as text."""
    text = data.decode("utf-8", "replace")
    if extension == "json":
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            pass
    return text


def sample_meta(raw: Mapping[str, Any]) -> str | None:
    """The meta of a sample whose `json`/`txt` were read (WebDataset members, or an image file's sidecars)."""
    txt = raw.get("txt")
    return meta_json({**stable_fields(raw.get("json"), txt if isinstance(txt, str) else None), **raw})


def cut_text(text: str, limit: int = MAX_TEXT_BYTES) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def column_value(value: Any) -> Any:
    """A Parquet scalar as JSON can hold it: strings cut, NaN and infinities null, times as ISO text."""
    if isinstance(value, str):
        return cut_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value if _scalar(value) else str(value)


def row_meta(columns: Mapping[str, Any]) -> str | None:
    """The meta of a Parquet row from its carried columns (already converted by `column_value`)."""
    present = {name: value for name, value in columns.items() if value is not None}
    if not present:
        return None
    return meta_json({**stable_fields(present), "columns": present})
