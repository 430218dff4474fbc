"""The names of a row's columns: what every row has, and what each mode adds beside its caption.

Names only (the Arrow types are in `pipeline.table.schema`), so that the config can refuse a mode whose
columns would collide with another column when it loads, without importing the table layer.
"""

from __future__ import annotations

# Every row, captioned or not, in this order.
# `duplicate_of`: the key whose captions this row carries (same image content, pipeline/engine/dedup.py), null for
# a row captioned for itself.
BASE_COLUMNS: tuple[str, ...] = ("key", "source", "member", "shard", "width", "height", "format", "status",
                                 "error", "meta", "duplicate_of")
# Carried by rows between the read stage and the commit, never written to the table.
# `attempt_base`: attempts a redone row (`run --redo`) already had; its new attempts are numbered after them.
# `content_hash`: the image's content (pipeline/io/content.py), decided by the read stage.
IN_FLIGHT_COLUMNS: tuple[str, ...] = ("shard_size", "pixels", "attempt_base", "content_hash")
# Per mode `m`: the caption in column `m`, and what produced it beside it. `m_raw` is the model's text
# before the mode's clean-up, null when the mode has none. Mode names come from the manifest, never from
# column names, so `m_raw` is not taken for a mode.
# `m_confidence` is the caption's 0..1 confidence (captioning/confidence.py), null without log-probabilities.
MODE_SUFFIXES: tuple[str, ...] = ("", "_raw", "_prompt", "_tokens", "_finish_reason", "_glitch", "_confidence",
                                  "_attempts", "_seed")
# Names a mode may not take: its caption column would be one of these.
RESERVED_COLUMNS = frozenset(BASE_COLUMNS + IN_FLIGHT_COLUMNS)


def check_mode_columns(names: list[str]) -> None:
    """Refuse modes whose columns collide: `tags` and `tags_raw` would both write a `tags_raw` column, and
    a mode `shard` or `pixels` would shadow or be shadowed by another column."""
    owner: dict[str, str] = {column: "a base column" for column in RESERVED_COLUMNS}
    for name in names:
        for suffix in MODE_SUFFIXES:
            column = name + suffix
            if column in owner:
                raise ValueError(f"mode {name!r} would write column {column!r}, which is already {owner[column]}: "
                                 "rename the mode")
            owner[column] = f"a column of mode {name!r}"
