"""The bytes of a committed row's image, read again from the run's input, for exports that copy images.

Rows record where their image came from (sink.py): a file's URI in `source` (folders, file lists), or a
container's URI in `source` and the image's place in it in `member` (a WebDataset tar member, a Parquet
row). Files are copied (or, locally, linked) one by one. Containers are re-read with the very readers the
run used (pipeline.io.sources.read_shard) over the shard's own plan, so the same key gets the same bytes:
a tar in one sequential pass, a Parquet shard row group by row group, one sample or batch in memory.

The run manifest keeps no storage options (they may hold credentials): the input is read with the options
given, else the manifest's when a run recorded some, else the output's, else the AWS environment.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import InputConfig
from pipeline.exports.table import Output
from pipeline.io.fs import is_local, open_fs, read_bytes, read_input
from pipeline.io.shards import Record, Shard
from pipeline.table.names import plan_path

ARCHIVE_FORMATS = ("webdataset", "parquet")


class LinkError(ValueError):
    """--link was asked for an image that is not a file of a local folder."""


@dataclass(frozen=True)
class InputAccess:
    """How an export reaches the run's input."""

    config: InputConfig
    link: bool = False  # hard links (symlinks across file systems) instead of copies; local files only


def input_access(output: Output, storage_options: dict[str, Any] | None, output_storage_options: dict[str, Any] | None,
                 link: bool = False) -> InputAccess:
    """The run's input config from its manifest, with storage options to read it (`storage_options`, else the
    manifest's, else the output's); `link` is checked at once."""
    recorded = dict((output.manifest.get("config") or {}).get("input") or {})
    if not recorded.get("uri"):
        raise ValueError(f"{output.uri}: the run manifest names no input.uri; its images cannot be read again")
    options = next((found for found in (storage_options, recorded.get("storage_options"), output_storage_options)
                    if found is not None), {})
    known = {name: value for name, value in recorded.items() if name in InputConfig.model_fields}
    config = InputConfig.model_validate({**known, "storage_options": options})
    if link:
        fs, root = open_fs(config.uri, options)
        if not is_local(fs) or config.format in ARCHIVE_FORMATS or not os.path.isdir(root):
            raise LinkError(f"--link needs image files in a local folder; this run's input is {config.uri} "
                            f"(format {config.format}): export without --link to copy the images")
    return InputAccess(config, link)


def _link(path: str, destination: str) -> None:
    os.unlink(destination)  # the reserved (empty) name
    try:
        os.link(path, destination)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        os.symlink(os.path.realpath(path), destination)  # another file system, or no hard links there


def copy_file(source: str, destination: str, access: InputAccess) -> None:
    """Copy (or link) the image file `source` to the local path `destination`; OSError if it cannot be read."""
    fs, path = open_fs(source, access.config.storage_options)
    if access.link:
        if not is_local(fs):
            raise LinkError(f"--link needs local image files; {source} is not one")
        _link(path, destination)
    elif is_local(fs):
        shutil.copyfile(path, destination)
    else:
        write_file(destination, read_input(fs, path))


def write_file(destination: str, data: bytes) -> None:
    with open(destination, "wb") as handle:
        handle.write(data)


def planned_shard(output: Output, shard_id: str) -> Shard:
    """The shard as the run planned it (kind, container, row groups): what its reader needs."""
    ledger = output.ledger
    try:
        return Shard.from_json(read_bytes(ledger.fs, ledger.plan_path(shard_id)).decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{output.uri}: no plan for shard {shard_id} ({plan_path('', shard_id)}), so the "
                                "images inside its container cannot be found again") from None


def archive_records(output: Output, shard_id: str, access: InputAccess) -> Iterator[Record]:
    """Every record of a tar or Parquet shard, read again as the run read it (error records included)."""
    from pipeline.io.sources import read_shard  # the readers pull in the layout detection

    if access.link:
        raise LinkError(f"--link needs image files; shard {shard_id} holds images inside a tar or Parquet file")
    shard = planned_shard(output, shard_id)
    return read_shard(shard, access.config)[1]
