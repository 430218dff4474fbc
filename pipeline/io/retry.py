"""Transient storage errors: told apart from permanent ones, retried with backoff, and never made data.

Object stores fail in two ways. Permanent failures (no such key, access denied, a corrupt object) are
facts about one input: readers turn them into error rows. Transient failures (throttling such as
S3's `SlowDown`, HTTP 500/502/503/504, timeouts, connections reset, refused or closed mid-body) say
nothing about the input: a later attempt usually succeeds. `retrying` retries those with exponential
backoff and jitter and, once its attempts are spent, raises `TransientStorageError`. That error is not
an `OSError`, so no reader's `except OSError` turns it into an error row: it fails the whole read task,
and Ray retries the task.

How s3fs reports them (s3fs 2026.9 on aiobotocore): botocore first retries 5xx and throttling itself
(`config_kwargs={"retries": {...}}` sets how often); s3fs then retries transport errors and errors whose
text names `SlowDown` (its `retries` attribute, 5 by default) and finally translates a `ClientError`
into an `OSError` by its code: `SlowDown`/`ServiceUnavailable`/503 become `OSError(EBUSY)`,
`InternalError`/500 `OSError(EREMOTEIO)`, `RequestTimeout` `TimeoutError`, unknown codes (502, 504)
`OSError(EIO)`, each with the `ClientError` as `__cause__`. Transport errors that exhaust s3fs's retries
escape untranslated (botocore's `ConnectionClosedError`, `ReadTimeoutError`, aiohttp's
`ClientPayloadError` ...). `is_transient` looks at all of these, down the `__cause__` chain.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec

from pipeline.config.limits import READ_ATTEMPTS, READ_RETRY_BASE_DELAY_S, READ_RETRY_MAX_DELAY_S

log = logging.getLogger("pipeline.io")
T = TypeVar("T")


class TransientStorageError(RuntimeError):
    """Storage kept failing in a way that usually passes; the read task fails and Ray retries it."""


@dataclass
class RetryPolicy:
    """How `retrying` waits by default (pipeline.config.limits gives the reasons); tests shorten the delays by
    setting these attributes."""

    attempts: int = READ_ATTEMPTS
    base_delay: float = READ_RETRY_BASE_DELAY_S  # seconds before the second attempt; doubled for each later one
    max_delay: float = READ_RETRY_MAX_DELAY_S


RETRY = RetryPolicy()

# S3 (and S3-compatible) error codes that mean "try again later".
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "BandwidthLimitExceeded",
    "ProvisionedThroughputExceededException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "OperationAborted", "PriorRequestNotComplete", "429", "500", "502", "503", "504",
})
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# errno values of transient OSErrors: s3fs maps SlowDown/503 to EBUSY and InternalError/500 to EREMOTEIO.
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                              errno.ECONNABORTED, errno.EPIPE, errno.EAGAIN, getattr(errno, "EREMOTEIO", -1)})
# Transport errors by class name (botocore, aiohttp, http.client, fsspec), so none of them is imported.
TRANSIENT_CLASSES = frozenset({
    "HTTPClientError", "ConnectionError", "ClientConnectionError", "ClientPayloadError", "ServerTimeoutError",
    "IncompleteReadError", "IncompleteRead", "ResponseStreamingError", "FSTimeoutError", "ResponseParserError",
    "TimeoutError", "Timeout",
})
# Never transient, whatever they were raised from.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


def _transient_one(err: BaseException) -> bool:
    if isinstance(err, TransientStorageError | TimeoutError | ConnectionError):
        return True
    if any(cls.__name__ in TRANSIENT_CLASSES for cls in type(err).__mro__):
        return True
    response = getattr(err, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = str((response.get("Error") or {}).get("Code", ""))
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in TRANSIENT_CODES or status in TRANSIENT_STATUS:
            return True
    return isinstance(err, OSError) and not isinstance(err, PERMANENT) and err.errno in TRANSIENT_ERRNOS


def is_transient(err: BaseException) -> bool:
    """True for failures worth retrying: throttling, 5xx, timeouts, dropped connections (see module doc)."""
    if isinstance(err, PERMANENT):
        return False
    return any(_transient_one(link) for link in _chain(err))


def _describe(args: tuple[Any, ...]) -> str:
    return next((arg for arg in args if isinstance(arg, str)), "storage")


def retrying(fn: Callable[..., T], *args: Any, attempts: int | None = None, base_delay: float | None = None,
             max_delay: float | None = None, what: str | None = None, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, retried on transient errors with exponential backoff and jitter.

    Permanent errors are raised at once, as they are. When `attempts` (default `RETRY.attempts`) are spent,
    raises `TransientStorageError` naming `what` (default: the first string argument, usually the path) and
    the last error. A `TransientStorageError` from inside is raised at once: retries never nest."""
    attempts = attempts or RETRY.attempts
    base = RETRY.base_delay if base_delay is None else base_delay
    ceiling = RETRY.max_delay if max_delay is None else max_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except TransientStorageError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == attempts:
                raise TransientStorageError(f"{what or _describe(args)}: storage still failing after {attempts} "
                                            f"attempts: {type(err).__name__}: {err}") from err
            delay = min(ceiling, base * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)  # jitter: readers throttled together spread out
            log.info("%s: transient storage error (%s: %s), attempt %d of %d, next in %.2f s",
                     what or _describe(args), type(err).__name__, err, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class RetryingReader(io.RawIOBase):
    """A read-only, seekable file on `fs` that survives transient errors.

    Opening and every read or seek go through `retrying`; before each new attempt the file is opened
    afresh at the same offset, since a file object that failed mid-read may hold a broken connection or
    a half-filled cache. Permanent errors pass through unchanged."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, **open_kwargs: Any) -> None:
        super().__init__()
        self._fs, self._path, self._open_kwargs = fs, path, open_kwargs
        self._position = 0
        self._handle = retrying(fs.open, path, "rb", what=path, **open_kwargs)

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):  # a broken handle may fail to close; it is dropped either way
            self._handle.close()
        self._handle = self._fs.open(self._path, "rb", **self._open_kwargs)
        self._handle.seek(self._position)

    def _attempt(self, operation: Callable[[Any], T]) -> T:
        first = True

        def once() -> T:
            nonlocal first
            if not first:
                self._reopen()
            first = False
            return operation(self._handle)

        return retrying(once, what=self._path)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._position = self._attempt(lambda handle: handle.seek(offset, whence))
        return self._position

    def read(self, size: int | None = -1) -> bytes:
        data = self._attempt(lambda handle: handle.read(-1 if size is None else size))
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            try:
                self._handle.close()
            finally:
                super().close()
