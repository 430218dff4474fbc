"""One way to reach storage: fsspec, for local paths and s3:// alike.

Credentials and endpoints come from the usual AWS environment variables or config files, or from
the config's `storage_options`; neither is ever logged or written to outputs.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def _with_env_endpoint(protocol: str, options: dict[str, Any]) -> dict[str, Any]:
    # Older botocore ignores AWS_ENDPOINT_URL; pass it explicitly so S3-compatible servers work.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint and "endpoint_url" not in options:
        client_kwargs = options.get("client_kwargs", {})
        if "endpoint_url" not in client_kwargs:
            return {**options, "endpoint_url": endpoint}
    return options


def open_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The file system for `uri` and the path inside it (no protocol, no trailing slash)."""
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    options = _with_env_endpoint(protocol, dict(storage_options or {}))
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


def _walk_local(root: str) -> Iterator[tuple[str, int]]:
    # Depth first, one directory in memory at a time. A folder sorts as "name/", so paths come out in
    # the byte order S3 lists keys in, and a local copy and an S3 copy give the same shards.
    with os.scandir(root) as scan:
        entries = sorted(scan, key=lambda entry: entry.name + "/" if entry.is_dir(follow_symlinks=True)
                         else entry.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            yield from _walk_local(entry.path)
        elif entry.is_file(follow_symlinks=True):
            yield entry.path, entry.stat().st_size


def _walk_s3(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    # ListObjectsV2 page by page: keys arrive in byte order, one page (1000 keys) in memory.
    bucket, prefix, _ = fs.split_path(root)
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    token = None
    while True:
        request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1000}
        if token:
            request["ContinuationToken"] = token
        page = fs.call_s3("list_objects_v2", **request)
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            # Skip folder markers and hidden files or folders, as the local walk does.
            if not relative.endswith("/") and not any(part.startswith(".") for part in relative.split("/")):
                yield f"{bucket}/{item['Key']}", int(item["Size"])
        if not page.get("IsTruncated"):
            return
        token = page["NextContinuationToken"]


def walk_files(fs: fsspec.AbstractFileSystem, root: str) -> Iterator[tuple[str, int]]:
    """Stream (path, size) of every file under `root` in a deterministic order."""
    if is_local(fs):
        yield from _walk_local(root)
    elif fs.protocol in ("s3", "s3a") or "s3" in getattr(fs, "protocol", ()):
        yield from _walk_s3(fs, root)
    else:
        for path, info in sorted(fs.find(root, detail=True).items()):
            yield path, int(info.get("size") or 0)
