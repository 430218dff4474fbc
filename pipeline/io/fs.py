"""One way to reach storage: fsspec, for local paths and s3:// alike.

Credentials and endpoints come from the usual AWS environment variables or config files, or from
the config's `storage_options`; neither is ever logged or written to outputs.

Input reads go through `retrying` / `RetryingReader` (pipeline.io.retry, re-exported here): transient
errors (throttling, 5xx, timeouts, dropped connections) are retried with backoff and, when they persist,
raised as `TransientStorageError` (not an OSError: the read task fails and Ray retries it); permanent
ones (not found, access denied, corrupt) are raised as they are, for readers to turn into error rows.

Listing (`walk_files`, pipeline.io.walk, re-exported here) streams paths in S3's byte order. Locally,
symlinks never make it loop or list a file twice by accident: regular files and folders are listed by
their path; a symlink to a folder is followed only if its real target lies outside the input root and
is not a folder already visited (visited folders are tracked by (st_dev, st_ino)); a symlink to a file
is listed only if its target lies outside the input root (inside it, the real file is listed already);
broken or looping symlinks and unreadable subfolders are skipped with a warning; hard links are separate
files. Hidden names (a leading dot) are skipped, locally and on S3.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.retry import RETRY, RetryingReader, RetryPolicy, TransientStorageError, is_transient, retrying
from pipeline.io.walk import walk_files

__all__ = ["RETRY", "TEMPORARY_PATTERN", "TEMPORARY_PREFIX", "RetryPolicy", "RetryingReader", "TransientStorageError",
           "atomic_folder", "atomic_path", "fsync_directory", "is_local", "is_transient", "join", "list_names",
           "open_fs", "read_bytes", "read_input", "remove_tree", "retrying", "temporary_beside", "to_uri",
           "walk_files", "write_atomic"]

# A temporary file or folder beside its target: `.tmp-<32 hex digits>-<the target's name>`. Hidden (readers and
# listings skip a leading dot), unique per write, and recognisable as a killed write's leftover.
TEMPORARY_PREFIX = ".tmp-"
TEMPORARY_PATTERN = r"\.tmp-[0-9a-f]{32}-"  # the prefix as a regular expression, uuid included


def _with_env_endpoint(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    # Older botocore ignores AWS_ENDPOINT_URL; pass it explicitly so S3-compatible servers work.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in options:
        client_kwargs = options.get("client_kwargs", {})
        if "endpoint_url" not in client_kwargs:
            return {**options, "endpoint_url": endpoint}
    return options


def _copied(value: Any) -> Any:
    """Dicts and lists copied all the way down; anything else (a session object, say) shared as it is."""
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copied(item) for item in value)
    return value


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system for `uri` and the path inside it (no protocol, no trailing slash)."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    # Copied: botocore fills in nested options (config_kwargs.retries) in place, which would change the
    # caller's dict and so fsspec's cache key, and give every later call a new file system.
    options = _with_env_endpoint(protocol, _copied(dict(storage_options or {})))
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path inside `fs` written as a URI a user (or another process) can open."""
    return fs.unstrip_protocol(path) if not is_local(fs) else path


# Atomic publishing: a file appears whole or not at all ----------------------------------------------------
def temporary_beside(path: str) -> str:
    """A fresh temporary name in `path`'s folder (see TEMPORARY_PREFIX)."""
    directory, name = posixpath.split(path)
    return posixpath.join(directory, f"{TEMPORARY_PREFIX}{uuid.uuid4().hex}-{name}")


def fsync_directory(directory: str) -> None:
    """Make the renames and links just done in the local folder `directory` durable: after a host crash a
    file published there exists with its content, or not at all (and a marker published after a part file
    cannot outlive it). Skipped where a folder cannot be opened or synced (Windows, some FUSE mounts)."""
    try:
        descriptor = os.open(directory or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)


def _fsync_file(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _exists_error(path: str) -> FileExistsError:
    return FileExistsError(errno.EEXIST, "exists already, and this write never replaces a file", path)


def _publish_local(temporary: str, path: str, replace: bool) -> None:
    """Put the complete, synced `temporary` at `path` in one step, then sync the folder."""
    if replace:
        os.replace(temporary, path)
    else:
        try:
            os.link(temporary, path)  # unlike a rename, never replaces what is there: FileExistsError
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename (not atomic together)
            if os.path.lexists(path):
                raise _exists_error(path) from None
            os.rename(temporary, path)
    fsync_directory(posixpath.dirname(path))


@contextmanager
def atomic_path(fs: fsspec.AbstractFileSystem, path: str, replace: bool = True) -> Iterator[str]:
    """A local file to write `path`'s new content to; leaving the block without an error publishes it whole.

    Local: the file is a temporary one beside `path`; it is fsynced, renamed over `path` (or, without
    `replace`, hard-linked to it, which fails rather than replace a file there) and the folder fsynced.
    Other file systems: the file is a local temporary one, uploaded once, whole (without `replace`, an
    existing object is refused first: best effort, not atomic with the upload). Without `replace` a file
    already at `path` raises FileExistsError and nothing is written. On an error nothing is published, and
    the temporary file is removed either way.
    """
    local = is_local(fs)
    if local:
        directory = posixpath.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        temporary = temporary_beside(path)
    else:
        handle, temporary = tempfile.mkstemp(prefix="pipeline-", suffix=f"-{posixpath.basename(path)}")
        os.close(handle)
    try:
        yield temporary
        if local:
            _fsync_file(temporary)
            _publish_local(temporary, path, replace)
        else:
            if not replace and fs.exists(path):
                raise _exists_error(path)
            fs.put_file(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


Writer = Callable[[BinaryIO], None]


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes | Writer, replace: bool = True) -> None:
    """Make `path` appear whole or not at all, holding `data`: bytes, or a callback that writes them to the
    binary file it is given (for content too big to hold in memory).

    Locally through a temporary file beside it (`atomic_path`: fsync, rename, fsync of the folder). On
    object stores bytes go up in a single PUT, already atomic: readers see the old object or the new one.
    Without `replace` an existing file raises FileExistsError (locally atomic, elsewhere best effort).
    """
    if not callable(data) and not is_local(fs):
        if not replace and fs.exists(path):
            raise _exists_error(path)
        fs.pipe_file(path, data)
        return
    with atomic_path(fs, path, replace) as temporary, open(temporary, "wb") as handle:
        if callable(data):
            data(handle)
        else:
            handle.write(data)


def _empty_folder(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return next(entries, None) is None


@contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """A new local folder to fill, beside `path`; leaving the block without an error puts it at `path` by
    renames, so readers see the old folder or the new one, never a half-built one (a folder already at
    `path` is moved aside, the new one renamed in, the old one deleted). On an error `path` is left as it
    was and the new folder is deleted. Whether `path` may be replaced is the caller's to check."""
    parent = posixpath.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    staging = temporary_beside(path)
    os.mkdir(staging)
    try:
        yield staging
        if not os.path.isdir(path) or _empty_folder(path):
            os.replace(staging, path)  # a missing or empty folder is replaced in one step
            fsync_directory(parent)
        else:
            old = posixpath.join(parent, f".old-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            os.rename(path, old)
            os.rename(staging, path)
            fsync_directory(parent)
            shutil.rmtree(old)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Remove the file or folder `path` and everything under it; nothing there is no error.

    On object stores the listing behind it is always fresh: s3fs caches listings per process and sees only
    its own writes, so a cached one could miss (and leave behind) what another process wrote."""
    if is_local(fs):
        # Not fs.rm: it calls os.getcwd(), which raises once a Ray job's working-dir copy (the driver's
        # current directory) has been cleaned up under it.
        if os.path.isdir(path):
            shutil.rmtree(path, onerror=_gone_is_fine)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return
    fs.invalidate_cache(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def _gone_is_fine(function: Callable[..., Any], path: str, info: Any) -> None:
    """rmtree's error handler: a file another process removed meanwhile is not an error."""
    error = info[1]
    if not isinstance(error, FileNotFoundError):
        raise error


def list_names(fs: fsspec.AbstractFileSystem, path: str, refresh: bool = True) -> list[str]:
    """Base names directly under `path` (empty if it does not exist).

    `refresh` (the default) bypasses s3fs's per-process listing cache: markers, plan and staging are written
    by other processes (Ray workers, commit tasks, another run), and a cached listing would not show them."""
    try:
        found = fs.ls(path, detail=False, refresh=True) if refresh else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in found)


def read_input(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """An input file's bytes, transient errors retried (see `retrying`)."""
    return retrying(fs.cat_file, path, what=path)

