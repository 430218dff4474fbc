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

Every change is a compare-and-swap against the version read (pipeline.io.conditional: conditional
PUTs on S3, flock() on `<output>/.lease.lock` plus link() or rename locally), so of two contenders for a
free or stale lease exactly one wins; the loser re-reads and sees a fresh, held lease. A write whose reply
was lost and that a client retried reads as beaten; callers then re-read and know their own record by its
holder id, so nobody mistakes a won lease for a lost one.

Fencing (DESIGN invariant 12). A lease alone is advisory: a holder frozen past its expiry (SIGSTOP, a
paused VM, a stalled host) and then resumed would write beside the run that took over. So right before it
writes a part file or a marker, a run proves the lease is still its own: `check()` raises LeaseLostError
unless, on this process's clock,
    now + margin < (start of the last successful write of the record) + ttl
The clock is CLOCK_BOOTTIME where there is one (monotonic, and it keeps counting while a machine sleeps,
so a suspended laptop does not think its lease fresh). `margin` is LEASE_FENCE_MARGIN_SHARE of the ttl
(config/limits.py): it covers the skew between hosts' wall clocks (another run takes over only once
`expires_at` has passed on its own clock) and the time one write takes once it has been let through.
Commits in other processes (Ray tasks) cannot see this object; they carry a `StoredLeaseFence`, which reads
the record itself and compares the holder id and `expires_at - margin` with the wall clock. What a fence
cannot rule out is a write let through in time that then takes longer than the margin (a PUT that hangs);
the commit's writes are conditional for that (table/ledger.py): such a late marker cannot replace one
written meanwhile, and a late part file lands under a name no marker names (removed by the next run).
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.config.limits import LEASE_FENCE_MARGIN_SHARE, LEASE_TTL_S
from pipeline.io.conditional import ConditionalFile, conditional_file
from pipeline.io.fs import open_fs, retrying, to_uri
from pipeline.table.names import LEASE_LOCK, lease_path

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


def _backend(output_uri: str, storage_options: dict[str, Any] | None) -> ConditionalFile:
    fs, root = open_fs(output_uri, storage_options)
    path = lease_path(root)
    return conditional_file(fs, path, lock=posixpath.join(posixpath.dirname(path), LEASE_LOCK))


def _read(backend: ConditionalFile) -> tuple[LeaseInfo, Any] | None:
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


def boot_clock() -> float:
    """Seconds on a clock that never goes back and keeps counting while the machine is suspended
    (CLOCK_BOOTTIME on Linux; time.monotonic elsewhere)."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


def fence_margin(ttl_s: float) -> float:
    """Seconds of a lease's life a write needs left before it is let through (see the module docstring)."""
    return ttl_s * LEASE_FENCE_MARGIN_SHARE


# The lease -------------------------------------------------------------------------------------------
class OutputLease:
    """The single-writer lease of one output.

    `with OutputLease(uri) as lease:` acquires (waiting only for a stale holder) and heartbeats until
    release; or call `acquire`, `start_heartbeat` and `release` yourself. The run calls `check()` right
    before each write of a part file or marker (the fence, see the module docstring): it raises
    LeaseLostError once a renewal found the lease taken over (`lost`), or when the last successful renewal
    is too old to prove the lease is still ours.
    """

    def __init__(self, output_uri: str, storage_options: dict[str, Any] | None = None, ttl_s: float = LEASE_TTL_S,
                 command: str | None = None, on_lost: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = boot_clock) -> None:
        """`clock` is the wall clock that records are stamped and judged by, `monotonic` the local clock the
        fence measures the lease's remaining life on (tests drive fake ones)."""
        self._backend = _backend(output_uri, storage_options)
        self.output_uri, self.storage_options = output_uri, dict(storage_options or {})
        self.uri = to_uri(self._backend.fs, self._backend.path)
        self.ttl_s, self.on_lost, self._clock, self._monotonic = float(ttl_s), on_lost, clock, monotonic
        self.margin_s = fence_margin(self.ttl_s)
        self._valid_from: float | None = None  # `monotonic` when the last successful write of our record began
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
            started = self._monotonic()
            current = _read(self._backend)
            if current is None:
                record = self._record(self._clock())
                version = self._backend.create_exclusive(record.to_bytes())
            elif current[0].holder == self.holder:  # ours (an earlier call, or a retried write that had landed)
                record, version = current
                started -= max(0.0, self._clock() - record.renewed_at)  # valid from when it was written
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
                self._valid_from = started
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
                started = self._monotonic()  # before the record is stamped: its expiry is no earlier
                record = self._record(self.info.acquired_at)
                version = self._backend.replace_if(self._version, record.to_bytes())
                if version is not None:
                    self.info, self._version, self._valid_from = record, version, started
                    return record
                current = _read(self._backend)
                if current is None or current[0].holder != self.holder:
                    other = ("deleted (taken over by a run that has finished since, or removed by hand)"
                             if current is None else f"taken over by {current[0].describe(self._clock())}")
                    self._mark_lost(f"the lease {self.uri} was {other}")
                    raise LeaseLostError(self.lost_reason)
                self._version = current[1]  # still ours: only our version was stale (a retried write)
            raise OSError(f"renewing {self.uri} kept conflicting")

    def _mark_lost(self, reason: str) -> None:
        self.lost, self.lost_reason = True, reason
        log.warning("%s: stop writing", reason)
        if self.on_lost:
            self.on_lost(reason)

    def valid_for(self) -> float:
        """Seconds this run can still prove the lease is its own, the fence's margin taken off (<= 0: not)."""
        if self._valid_from is None:
            return 0.0
        return self._valid_from + self.ttl_s - self.margin_s - self._monotonic()

    def check(self) -> None:
        """The fence: return only if the lease is provably ours for at least the margin; else LeaseLostError."""
        if self.lost:
            raise LeaseLostError(self.lost_reason)
        if self.info is None:
            raise LeaseLostError(f"{self.uri} is not held by this run")
        if self.valid_for() <= 0:
            renewed = self._monotonic() - (self._valid_from or 0.0)
            raise LeaseLostError(
                f"this run could not renew its lease {self.uri} in time (last renewed {renewed:.0f} s ago; a lease "
                f"lasts {self.ttl_s:.0f} s and a write needs {self.margin_s:.0f} s of it left), so the output may "
                "have been taken over by another run; stopped without writing more")

    def fence(self, output_uri: str | None = None) -> StoredLeaseFence:
        """A fence for commits in other processes (Ray tasks): checks the stored record, see StoredLeaseFence."""
        return StoredLeaseFence(output_uri or self.output_uri, self.storage_options, self.holder, self.margin_s)

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
            version, self.info, self._valid_from = self._version, None, None
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


@dataclass(frozen=True)
class StoredLeaseFence:
    """The fence of a commit that runs in another process (a Ray task), where the driver's OutputLease is
    out of reach: `check()` reads the lease record from storage and lets a write through only if the
    record still names `holder` and will not expire within `margin_s` on this host's wall clock.

    Chosen over carrying the driver's valid-until time in the task: that would be stale by the time a
    queued task runs (a commit waiting behind others would be refused while the driver renews fine), and
    the record is the very thing another run judges expiry by. It costs one GET per check (two per
    commit), and like the lease itself it relies on hosts' clocks agreeing to within the margin."""

    output_uri: str
    storage_options: dict[str, Any] = field(repr=False)
    holder: str
    margin_s: float

    def check(self) -> None:
        info = retrying(read_lease, self.output_uri, self.storage_options, what=f"the lease of {self.output_uri}")
        now = time.time()
        if info is None:
            raise LeaseLostError(f"the lease of {self.output_uri} is gone (its run ended or it was deleted): this "
                                 "commit stopped without writing")
        if info.holder != self.holder:
            raise LeaseLostError(f"the output {self.output_uri} was taken over by {info.describe(now)}: this "
                                 "commit stopped without writing")
        if info.expires_at - self.margin_s <= now:
            raise LeaseLostError(f"the lease of {self.output_uri} was not renewed in time (it expires in "
                                 f"{info.expires_at - now:.0f} s, within the {self.margin_s:.0f} s margin a write "
                                 "needs), so the output may have been taken over: this commit stopped without "
                                 "writing")
