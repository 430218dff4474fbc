"""WebDataset tars of a target size (`shard-000000.tar`, ...): each committed ok row as one sample.

    <name>.<ext>   the image's bytes as they came from the input (read again by sources.py)
    <name>.json    key, source, member, shard, width, height, format, meta (parsed), and every mode's columns
                   as the table names them (`m`, `m_raw`, `m_prompt`, `m_tokens`, `m_finish_reason`, `m_glitch`,
                   `m_attempts`, `m_seed`)
    <name>.txt     the chosen modes' captions (`--modes`, default all in run order), one line per mode

The WebDataset loader groups a tar's members into samples by the part of the name before the first dot of
its base name, so keys (`cat/a.b.jpg`, `with space/é ü.jpg`) cannot be sample names as they are. A sample is
named by its running number in the export, zero-padded to nine digits, and its key with every run of
characters other than letters, digits, `_` and `-` turned into one `_` (cut to 64 characters):
`000000012_cat_a_b_jpg`. Names are unique by the number, free of dots and slashes, sort in export order, and
the key itself is in the json. The image's extension is its member's or file's own, else one for its format.

Tars are written with Python's `tarfile`, deterministically (mtime 0, uid and gid 0, no user or group
names, mode 0644, PAX headers for long or non-ASCII names), so an export written again is the same bytes.
Each sample goes to the tar as it comes: one image in memory at a time. Files, their sizes, resuming and
refusals are rolling.py's.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import Any

from pipeline.captioning.columns import MODE_SUFFIXES
from pipeline.exports.names import image_extension
from pipeline.exports.rolling import Layout, RollingCounts, describe, export_rolling, parse_size
from pipeline.exports.sources import input_access
from pipeline.exports.stream import Item
from pipeline.exports.table import check_modes, open_output
from pipeline.exports.txt import sidecar_text

DEFAULT_TARGET_SIZE = "1GB"
NAME_DIGITS = 9
MAX_KEY_PART = 64
_NOT_NAME = re.compile(r"[^\w-]+")
_TAR_BLOCK = 512


def file_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def sample_name(index: int, key: str) -> str:
    """`000000012_cat_a_b_jpg` for row 12 of key `cat/a.b.jpg`: no dot, no slash, unique by the number."""
    cleaned = _NOT_NAME.sub("_", key).strip("_")[:MAX_KEY_PART].rstrip("_")
    return f"{index:0{NAME_DIGITS}d}" + (f"_{cleaned}" if cleaned else "")


def sample_extension(row: dict[str, Any]) -> str:
    return image_extension(row).lstrip(".").lower() or "jpg"


def _meta(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def sample_json(row: dict[str, Any], all_modes: list[str]) -> dict[str, Any]:
    """Everything the table knows about the row: its base columns (meta parsed) and every mode's columns."""
    data = {name: row.get(name) for name in ("key", "source", "member", "shard", "width", "height", "format")}
    data["meta"] = _meta(row.get("meta"))
    for mode in all_modes:
        data.update({mode + suffix: row[mode + suffix] for suffix in MODE_SUFFIXES if mode + suffix in row})
    return data


class TarPart:
    """One `shard-NNNNNN.tar` being written, a sample at a time."""

    def __init__(self, path: str, modes: list[str], all_modes: list[str]) -> None:
        self.modes, self.all_modes = modes, all_modes
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by close() or abort())
        self.tar = tarfile.open(fileobj=self.handle, mode="w", format=tarfile.PAX_FORMAT,  # noqa: SIM115
                                encoding="utf-8")

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, item: Item, index: int) -> None:
        row = item.row
        name = sample_name(index, str(row["key"]))
        self._member(f"{name}.{sample_extension(row)}", item.data or b"")
        self._member(f"{name}.json", json.dumps(sample_json(row, self.all_modes), ensure_ascii=False).encode("utf-8"))
        self._member(f"{name}.txt", sidecar_text(row, self.modes).encode("utf-8"))
        # TarFile keeps every TarInfo it wrote (for listing an archive it reads); a writer never needs them, and
        # a 1 GB tar of small images would hold hundreds of thousands.
        self.tar.members.clear()

    def written(self) -> int:
        return self.handle.tell()

    def buffered(self) -> int:
        return 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.tar.close()  # the end-of-archive blocks; publishing (targets.new_file) fsyncs and renames
        self.handle.close()

    def abort(self) -> None:
        self.handle.close()


def sample_size(item: Item, modes: list[str]) -> int:
    """About the bytes a sample adds to a tar: three headers, the image, the json and the text, padded."""
    row = item.row
    texts = sum(len(str(value)) for value in row.values() if isinstance(value, str))
    captions = sum(len(str(row.get(mode) or "")) for mode in modes)
    return 3 * 2 * _TAR_BLOCK + len(item.data or b"") + texts + captions + 256


def export_webdataset(output_uri: str, target_dir: str, modes: list[str] | None = None,
                      storage_options: dict[str, Any] | None = None, *,
                      target_size: str | int = DEFAULT_TARGET_SIZE,
                      input_storage_options: dict[str, Any] | None = None, overwrite: bool = False) -> RollingCounts:
    """Write (or resume) the WebDataset export of every committed ok row into the local folder `target_dir`.
    Images are read with `input_storage_options` (else the manifest's, else the output's)."""
    output = open_output(output_uri, storage_options)
    modes = check_modes(output, modes)
    size = parse_size(target_size)
    access = input_access(output, input_storage_options, storage_options)
    all_modes = output.mode_names

    def open_part(path: str) -> TarPart:
        return TarPart(path, modes, all_modes)

    def item_size(item: Item) -> int:
        return sample_size(item, modes)

    layout = Layout("webdataset", file_name, open_part, item_size)
    return export_rolling(output, target_dir, layout, {"modes": modes}, size, None, access, overwrite)


def describe_webdataset(counts: RollingCounts, target_dir: str) -> str:
    pattern = os.path.join(target_dir, f"shard-{{{0:06d}..{max(counts.files - 1, 0):06d}}}.tar")
    return (describe(counts, target_dir, "tars") +
            f"\nload it with webdataset.WebDataset({pattern!r}) or datasets.load_dataset(\"webdataset\", "
            f"data_files={os.path.join(target_dir, 'shard-*.tar')!r}, split=\"train\")")
