"""Where exports write: `--to` means what it says, nothing existing is replaced unless asked, writes are atomic.

- A file export (JSONL, the gallery page) refuses a `--to` that is a folder (or ends in `/`), and an
  existing file unless `overwrite`. Locally it writes a temporary file beside the target and moves it into
  place at the end; without `overwrite` the move is a hard link, which fails rather than replace a file
  that appeared meanwhile. For object stores the file is written locally first and uploaded once, whole.
- A folder export (sidecar .txt, imagefolder) refuses a `--to` that is a file.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from pipeline.io.fs import is_local


class TargetError(ValueError):
    """`--to` names something this export must not write to, or would replace without --overwrite."""


def check_file_target(target: str, fs: fsspec.AbstractFileSystem, path: str, what: str, example: str,
                      overwrite: bool) -> None:
    """Refuse a folder, and an existing file unless `overwrite`; `example` is a file name to suggest."""
    if target.endswith("/") or fs.isdir(path):
        raise TargetError(f"--to {target} is a folder; {what} writes one file, e.g. "
                          f"{posixpath.join(target.rstrip('/'), example)}")
    if not overwrite and (fs.exists(path) or (is_local(fs) and os.path.lexists(path))):
        raise TargetError(f"{target} exists; pass --overwrite to replace it")


def check_folder_target(target: str, fs: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    if fs.isfile(path):
        raise TargetError(f"--to {target} is a file; {what} writes a folder of files")


def _publish(temporary: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)  # unlike a rename, never replaces what is there
    except FileExistsError:
        raise TargetError(f"{path} appeared while the export ran; it was kept and nothing was written") from None
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise TargetError(f"{path} appeared while the export ran; it was kept and nothing was written") from None
        os.rename(temporary, path)


@contextmanager
def new_file(fs: fsspec.AbstractFileSystem, path: str, overwrite: bool) -> Iterator[str]:
    """A local path to write the new file at; leaving the block without an error puts it at `path`, whole:
    locally by a move from beside it, on object stores by one upload (a failed export uploads nothing)."""
    if is_local(fs):
        directory, name = posixpath.split(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}-{name}")
    else:
        handle, temporary = tempfile.mkstemp(prefix="pipeline-export-", suffix=f"-{posixpath.basename(path)}")
        os.close(handle)
    try:
        yield temporary
        if is_local(fs):
            _publish(temporary, path, overwrite)
        else:
            fs.put_file(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def write_new(fs: fsspec.AbstractFileSystem, path: str, data: bytes, overwrite: bool) -> None:
    """Write `data` as the file `path` atomically, replacing a file there only with `overwrite`."""
    with new_file(fs, path, overwrite) as temporary, open(temporary, "wb") as handle:
        handle.write(data)
