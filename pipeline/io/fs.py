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

import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.io.retry import RETRY, RetryingReader, RetryPolicy, TransientStorageError, is_transient, retrying
from pipeline.io.walk import walk_files

__all__ = ["RETRY", "RetryPolicy", "RetryingReader", "TransientStorageError", "is_local", "is_transient", "join",
           "list_names", "open_fs", "read_bytes", "read_input", "remove_tree", "retrying", "to_uri", "walk_files",
           "write_atomic"]


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


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` appear whole or not at all.

    Local: write a temporary file beside it, fsync, rename over the target. Object stores: a
    single PUT is already atomic, readers see the old object or the new one.
    """
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    directory = posixpath.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def remove_tree(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if is_local(fs):
        # Not fs.rm: it calls os.getcwd(), which raises once a Ray job's working-dir copy (the driver's
        # current directory) has been cleaned up under it.
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    elif fs.exists(path):
        fs.rm(path, recursive=True)


def list_names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Base names directly under `path` (empty if it does not exist)."""
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def read_input(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """An input file's bytes, transient errors retried (see `retrying`)."""
    return retrying(fs.cat_file, path, what=path)

