"""One writer per output: a lease at `<output>/_lease.json`, renewed by a heartbeat.

The record names its holder (a uuid per run, host, pid and process start, user, command) and carries
`acquired_at`, `renewed_at`, `expires_at` (wall time) and `ttl_s`. The holder renews every ttl/3.

Who holds it (`LeaseInfo.state`):
  gone     the holder ran on this machine (same hostname, boot id and pid namespace) and its process
           (pid plus start time, so a reused pid does not count) is gone: free at once, a SIGKILLed run's
           re-run takes over immediately;
  expired  `expires_at` has passed: free (whatever the host);
  stale    not renewed for more than two heartbeats (2/3 ttl) but not expired: probably dead, but on
           another host only expiry can tell. `acquire(wait=True)` waits for expiry (calling `on_wait`)
           and takes over, or refuses the moment a renewal shows it alive;
  held     renewed within the last two heartbeats: alive; `acquire` refuses at once, never waits.
Wall clocks of the hosts sharing an output must agree to well within ttl/3 (NTP).

Every change is a compare-and-swap against the version read, so of two contenders for a free or
stale lease exactly one wins; the loser re-reads and sees a fresh, held lease:
  s3     PutObject with IfNoneMatch='*' creates; PutObject / DeleteObject with IfMatch=<ETag read>
         renew, take over and release; 412 PreconditionFailed or 409 ConditionalRequestConflict means
         another writer won. A server that rejects conditional deletes gets a re-read, then a delete.
  local  each change runs under flock() on `<output>/.lease.lock`, a file never deleted, which the
         kernel releases when its process dies (so no stale lock to break); inside it the record is
         compared byte for byte with the version read, then replaced by temp file + fsync + rename,
         or created by link() of a complete temp file (fails if present), both pipeline.io.fs's
         `write_atomic`, so readers, who take no lock, see a whole record or none. Without flock (some
         FUSE mounts) the compare and the rename are not atomic together.
  other  fsspec protocols compare and write without atomicity: best effort, one writer in practice.
A write whose reply was lost and that a client retried reads as beaten; callers then re-read and know
their own record by its holder id, so nobody mistakes a won lease for a lost one.
A lease is advisory: a holder frozen past expiry can write until its next heartbeat sees `lost`.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import logging
import os
import posixpath
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.config.limits import LEASE_TTL_S
from pipeline.io.fs import is_local, open_fs, to_uri, write_atomic
from pipeline.table.names import LEASE_LOCK, lease_path

try:
    import fcntl
except ImportError:  # Windows: no flock, see the docstring
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live run holds the output's lease."""

    def __init__(self, message: str, info: LeaseInfo) -> None:
        super().__init__(message)
        self.info = info


class LeaseLostError(RuntimeError):
    """Our lease was taken over (or could not be renewed before expiry): stop writing."""


# Who we are ------------------------------------------------------------------------------------------
def _machine() -> str | None:
    # Hostnames can repeat (containers); boot id and pid namespace say whether a pid means the same process.
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return f"{handle.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process(pid: int) -> tuple[bool, str | None]:
    """(alive, start token) of a pid on this machine; the token is None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
        rest = stat[stat.rindex(b")") + 2:].split()  # the command name may hold spaces and parentheses
        return rest[0] not in (b"Z", b"X"), f"linux:{rest[19].decode()}"  # state, starttime (field 22)
    except FileNotFoundError:
        if os.path.exists("/proc/self/stat"):
            return False, None
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: psutil if installed, else the pid alone
        import psutil
    except ImportError:
        psutil = None
    gone = (ProcessLookupError, psutil.NoSuchProcess) if psutil else (ProcessLookupError,)
    try:
        if psutil is not None:
            process = psutil.Process(pid)
            return process.status() != psutil.STATUS_ZOMBIE, f"psutil:{process.create_time():.2f}"
        os.kill(pid, 0)
    except gone:
        return False, None
    except Exception:  # exists but is not ours to inspect
        pass
    return True, None


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        return str(os.getuid())


def _command() -> str:
    # Never record secrets a `--set key=...` may carry.
    words = [re.sub(r"(?i)^([^=]*(secret|token|password|key)[^=]*)=.*", r"\1=***", w) for w in sys.argv]
    return " ".join(words)[:500]


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


# The record ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    proc_start: str | None
    machine: str | None
    user: str
    command: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LeaseInfo:
        record = json.loads(data)
        return cls(**{f.name: record[f.name] for f in fields(cls)})  # extra keys: a newer writer's

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.machine == _machine()

    def state(self, now: float | None = None) -> str:
        """'held', 'stale', 'expired' or 'gone' (see the module docstring)."""
        now = time.time() if now is None else now
        if self.on_this_machine():
            alive, start = _process(self.pid)
            if not alive or (start and self.proc_start and start != self.proc_start):
                return "gone"
        if self.expires_at <= now:
            return "expired"
        return "stale" if now - self.renewed_at > 2 * self.ttl_s / 3 else "held"

    def is_live(self, now: float | None = None) -> bool:
        return self.state(now) in ("held", "stale")

    def describe(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        return (f"host {self.host}, pid {self.pid}, user {self.user} ({self.command!r}), holding it since "
                f"{_when(self.acquired_at)}, last heartbeat {now - self.renewed_at:.0f} s ago")


# Storage backends: read -> (bytes, version) or None; create / replace -> the new version, None if beaten.
class _Backend:
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


class _LocalBackend(_Backend):
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(self.folder, exist_ok=True)
        descriptor = os.open(posixpath.join(self.folder, LEASE_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError, AttributeError):  # no flock here: see the docstring
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # releases the flock

    # Created and replaced as any backend's (write_atomic: a link() or a rename of a complete, fsynced
    # temporary file), under the lock.
    def _remove(self) -> None:
        os.remove(self.path)


def _beaten(error: BaseException) -> bool:
    """A conditional request that another writer won (or whose object it deleted)."""
    response = getattr(error.__cause__, "response", None) or getattr(error, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    return isinstance(error, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict",
                                                          "NoSuchKey")


class _S3Backend(_Backend):
    def __init__(self, fs: Any, path: str) -> None:
        super().__init__(fs, path)
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict[str, Any] | None:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as error:
            if _beaten(error):
                return None
            raise

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


def _backend(output_uri: str, storage_options: dict[str, Any] | None) -> _Backend:
    fs, root = open_fs(output_uri, storage_options)
    path = lease_path(root)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    kind = _LocalBackend if is_local(fs) else _S3Backend if protocols & {"s3", "s3a"} else _Backend
    return kind(fs, path)


def _read(backend: _Backend) -> tuple[LeaseInfo, Any] | None:
    current = backend.read()
    if current is None:
        return None
    try:
        return LeaseInfo.from_bytes(current[0]), current[1]
    except (ValueError, TypeError, KeyError) as error:
        where = to_uri(backend.fs, backend.path)
        raise RuntimeError(f"unreadable lease {where} ({error}): delete it if no run writes this output") from None


def read_lease(output_uri: str, storage_options: dict[str, Any] | None = None) -> LeaseInfo | None:
    """The output's lease record, or None if no run holds or held one; see `LeaseInfo.state`."""
    current = _read(_backend(output_uri, storage_options))
    return current and current[0]


# The lease -------------------------------------------------------------------------------------------
class OutputLease:
    """The single-writer lease of one output.

    `with OutputLease(uri) as lease:` acquires (waiting only for a stale holder) and heartbeats until
    release; or call `acquire`, `start_heartbeat` and `release` yourself. The run should call `check()`
    before each commit: it raises LeaseLostError once a renewal found the lease taken over (`lost`).
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None, ttl_s: float = LEASE_TTL_S,
                 command: str | None = None, on_lost: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """`clock` is the wall clock that records are stamped and judged by (tests drive a fake one)."""
        self._backend = _backend(output_uri, storage_options)
        self.uri = to_uri(self._backend.fs, self._backend.path)
        self.ttl_s, self.on_lost, self._clock = float(ttl_s), on_lost, clock
        self.holder = uuid.uuid4().hex
        self.command = _command() if command is None else command
        self.info: LeaseInfo | None = None
        self.lost, self.lost_reason = False, ""
        self._version: Any = None
        # renew() runs on the heartbeat thread and on callers'; reentrant so that `on_lost` may call release().
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self, acquired_at: float) -> LeaseInfo:
        now = self._clock()
        return LeaseInfo(self.holder, socket.gethostname(), os.getpid(), _process(os.getpid())[1], _machine(),
                         _user(), self.command, acquired_at, now, now + self.ttl_s, self.ttl_s)

    def acquire(self, wait: bool = True, on_wait: Callable[[LeaseInfo, float], None] | None = None) -> LeaseInfo:
        """Take the lease, or raise LeaseHeldError. A live holder is refused at once; a stale one is
        waited for (wait=True, calling `on_wait(holder, seconds_left)` at every poll, ttl/20 and at most
        1 s apart) and taken over."""
        while True:
            current = _read(self._backend)
            if current is None:
                record = self._record(self._clock())
                version = self._backend.create_exclusive(record.to_bytes())
            elif current[0].holder == self.holder:  # ours (an earlier call, or a retried write that had landed)
                record, version = current
            else:
                info, seen = current
                state = info.state(self._clock())
                if state == "held" or (state == "stale" and not wait):
                    raise LeaseHeldError(self._held_message(info, state), info)
                if state == "stale":
                    left = info.expires_at - self._clock()
                    if on_wait:
                        on_wait(info, left)
                    time.sleep(min(max(left, 0.01), max(info.ttl_s / 20, 0.05), 1.0))
                    continue
                record = self._record(self._clock())
                version = self._backend.replace_if(seen, record.to_bytes())  # the takeover
            if version is not None:
                self.info, self._version, self.lost, self.lost_reason = record, version, False, ""
                return record
            # Another contender won this round: read again, it is probably held now.

    def _held_message(self, info: LeaseInfo, state: str) -> str:
        now, output, expiry = self._clock(), posixpath.dirname(self.uri), _when(info.expires_at)
        stale = (f" It has not renewed for {now - info.renewed_at:.1f} s (it should every {info.ttl_s / 3:.1f} s), "
                 "so it may be dead: a run that waits takes over at expiry." if state == "stale" else "")
        dead = ("" if info.on_this_machine() else
                f"; if you are sure it is dead on another machine, wait until {expiry} or delete {self.uri}")
        return (f"{output} is being written by another run ({info.describe(now)}); its lease expires at {expiry} "
                f"unless renewed.{stale} One writer per output, so this run stops. Wait for that run to finish, or "
                f"stop it (pid {info.pid} on {info.host}){dead}.")

    def renew(self) -> LeaseInfo:
        """Push expiry ttl_s ahead; LeaseLostError if the lease is no longer ours, OSError and such if the
        store failed (retry: the lease stays ours until it expires)."""
        with self._lock:
            if self.info is None or self.lost:
                raise LeaseLostError(self.lost_reason or f"{self.uri} is not held")
            for _ in range(3):
                record = self._record(self.info.acquired_at)
                version = self._backend.replace_if(self._version, record.to_bytes())
                if version is not None:
                    self.info, self._version = record, version
                    return record
                current = _read(self._backend)
                if current is None or current[0].holder != self.holder:
                    other = "deleted" if current is None else f"taken over by {current[0].describe(self._clock())}"
                    self._mark_lost(f"the lease {self.uri} was {other}")
                    raise LeaseLostError(self.lost_reason)
                self._version = current[1]  # still ours: only our version was stale (a retried write)
            raise OSError(f"renewing {self.uri} kept conflicting")

    def _mark_lost(self, reason: str) -> None:
        self.lost, self.lost_reason = True, reason
        log.warning("%s: stop writing", reason)
        if self.on_lost:
            self.on_lost(reason)

    def check(self) -> None:
        if self.lost:
            raise LeaseLostError(self.lost_reason)

    def start_heartbeat(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl_s / 3
        delay = interval
        while not self._stop.wait(delay):
            try:
                self.renew()
                delay = interval
            except LeaseLostError:
                return
            except Exception as error:  # transient: retry soon, until the lease would expire anyway
                if self.info is None:  # released meanwhile
                    return
                if self._clock() >= self.info.expires_at:
                    self._mark_lost(f"could not renew {self.uri} before it expired ({error})")
                    return
                log.warning("renewing %s failed (%s); retrying", self.uri, error)
                delay = min(1.0, interval / 4)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, if it is still ours."""
        self._stop_heartbeat()
        with self._lock:
            version, self.info = self._version, None
            if version is None or self.lost:
                return
            self._version = None
            try:
                if not self._backend.delete_if(version):
                    current = _read(self._backend)
                    if current and current[0].holder == self.holder:  # ours, under a version we missed
                        self._backend.delete_if(current[1])
            except Exception as error:  # it expires by itself
                log.warning("could not release %s (%s)", self.uri, error)

    def __enter__(self) -> OutputLease:
        if self.info is None:
            self.acquire()
        self.start_heartbeat()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
