"""Compare-and-swap on one stored file: the lease, and the commit markers and part files of an output.

`conditional_file(fs, path, lock)` gives an object with four operations; of two writers racing on one
file, exactly one wins each round:

    read()                   -> (bytes, version) or None when the file does not exist
    create_exclusive(data)   -> the new version, or None when a file is there already
    replace_if(version, data)-> the new version, or None when the file is no longer `version` (or is gone)
    delete_if(version)       -> True, or False when the file is no longer `version`

  s3     PutObject with IfNoneMatch='*' creates; PutObject / DeleteObject with IfMatch=<ETag read>
         replace and delete; 412 PreconditionFailed or 409 ConditionalRequestConflict means another
         writer won. A server that rejects conditional deletes gets a re-read, then a delete.
  local  each change runs under flock() on the `lock` file (never deleted; the kernel releases the lock
         when its process dies, so there is no stale lock to break); inside it the file is compared byte
         for byte with the version read, then replaced by temp file + fsync + rename, or created by link()
         of a complete temp file (fails if present), both `write_atomic`, so readers, who take no lock,
         see a whole file or none. Without flock (some FUSE mounts) the compare and the rename are not
         atomic together.
  other  fsspec protocols compare and write without atomicity: best effort, one writer in practice.

A write whose reply was lost and that a client retried reads as beaten (the first attempt landed): the
caller re-reads and knows its own content (the lease by its holder id, a marker by its holder and part).
Nothing here retries transient errors; callers wrap the operations in `retrying` (pipeline.io.retry).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from pipeline.io.fs import is_local, write_atomic

try:
    import fcntl
except ImportError:  # Windows: no flock, see the docstring
    fcntl = None  # type: ignore[assignment]


class ConditionalFile:
    """Any fsspec file system: compare, then write, not atomic (best effort). Local adds the lock."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path, self.folder = fs, path, posixpath.dirname(path)

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, data

    def _locked(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def _create(self, data: bytes) -> bool:
        try:
            write_atomic(self.fs, self.path, data, replace=False)  # locally a link(): fails if present
        except FileExistsError:
            return False
        return True

    def _replace(self, data: bytes) -> None:
        write_atomic(self.fs, self.path, data)

    def _remove(self) -> None:
        self.fs.rm_file(self.path)

    def create_exclusive(self, data: bytes) -> Any:
        with self._locked():
            return data if self._create(data) else None

    def replace_if(self, version: Any, data: bytes) -> Any:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return None
            self._replace(data)
            return data

    def delete_if(self, version: Any) -> bool:
        with self._locked():
            current = self.read()
            if current is None or current[1] != version:
                return False
            self._remove()
            return True


class _LocalFile(ConditionalFile):
    def __init__(self, fs: Any, path: str, lock: str | None) -> None:
        super().__init__(fs, path)
        self.lock = lock

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self.lock is None:
            yield
            return
        os.makedirs(posixpath.dirname(self.lock) or ".", exist_ok=True)
        os.makedirs(self.folder or ".", exist_ok=True)
        descriptor = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError, AttributeError):  # no flock here: see the docstring
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the flock

    def read(self) -> tuple[bytes, Any] | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return data, data

    # Created and replaced as any backend's (write_atomic: a link() or a rename of a complete, fsynced
    # temporary file), under the lock.
    def _remove(self) -> None:
        os.remove(self.path)


def beaten(error: BaseException) -> bool:
    """A conditional request that another writer won (or whose object it deleted)."""
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return isinstance(error, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                          "NoSuchKey")


class _S3File(ConditionalFile):
    def __init__(self, fs: Any, path: str) -> None:
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            response = self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as error:
            if beaten(error):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)  # s3fs's listing cache knows nothing of calls made here
        return response

    def read(self) -> tuple[bytes, Any] | None:
        from fsspec.asyn import sync

        response = self._call("get_object")  # body and ETag from one request: they match
        return None if response is None else (sync(self.fs.loop, response["Body"].read), response["ETag"])

    def create_exclusive(self, data: bytes) -> Any:
        response = self._call("put_object", Body=data, IfNoneMatch="*")
        return response and response["ETag"]

    def replace_if(self, version: Any, data: bytes) -> Any:
        response = self._call("put_object", Body=data, IfMatch=version)
        return response and response["ETag"]

    def delete_if(self, version: Any) -> bool:
        try:
            return self._call("delete_object", IfMatch=version) is not None
        except OSError:  # a server without conditional deletes: re-read, then delete (a short race)
            current = self.read()
            if current is None or current[1] != version:
                return False
            self._call("delete_object")
            return True


def is_s3(fs: Any) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"})


def conditional_file(fs: Any, path: str, lock: str | None = None) -> ConditionalFile:
    """Compare-and-swap access to `path` on `fs`; `lock` is the local lock file that makes it atomic there
    (None: locally by link() for creation only, compare-then-rename otherwise)."""
    if is_local(fs):
        return _LocalFile(fs, path, lock)
    return _S3File(fs, path) if is_s3(fs) else ConditionalFile(fs, path)
