"""What each caption actor's engine is doing, for the driver's console: starting, ready, busy or idle, failed.

Each caption actor writes one small JSON entry about itself to Ray's internal key-value store (kept by the
GCS, the cluster's head process) at every change: its constructor started (`starting`), its engine is built
(`ready`), a batch went in or came out (the age of its oldest batch in hand, or none), it failed (`failed`,
before Ray replaces it) or stopped (`exited`: the entry is removed). The key is the run's Ray job id and the
actor's own id, so the driver lists its own run's engines with one prefix (run/engines.py, every second or
two), and two runs on one cluster never mix. An actor Ray restarts keeps its actor id: the new process
overwrites the old entry with `starting`, so a restart shows as an engine loading again.

Why this channel and not another:
- a named Ray actor as a board would be one more worker process to start (a Python interpreter importing
  Ray: CPU and memory a small node feels) and to end with the run;
- Ray's state API (`ray.util.state.list_actors`) needs the dashboard, which a local Ray runs without, and
  says only whether the actor's constructor returned, not how old a batch is;
- the internal key-value store costs no process and a GCS round trip (about a millisecond) per change:
  a handful per actor's life plus two per batch, nothing per image.
It is `ray.experimental.internal_kv`, underscored but used by Ray's own libraries since Ray 1.0. Every
call here is guarded: when it fails or is missing, the actor captions as before and the console falls
back to lines without engine states.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

log = logging.getLogger("pipeline.engine.states")

NAMESPACE = "joycaption-pipeline"
PREFIX = "engines"

STARTING, READY, FAILED, EXITED = "starting", "ready", "failed", "exited"
STATES = (STARTING, READY, FAILED, EXITED)


@dataclass(frozen=True)
class EngineState:
    """One caption actor's engine as it last reported itself. Times are Unix times (the actor's clock)."""

    actor: str  # Ray's actor id: the same across the actor's restarts
    state: str  # one of STATES
    since: float  # when this state began
    started: float  # when this incarnation's constructor began (the engine's load time is since - started)
    updated: float = 0.0  # when it last reported (a batch in or out, a change of state)
    pid: int = 0
    node: str = ""  # the host's name (the same for every node of a one-machine cluster)
    node_id: str = ""  # Ray's node id (hex): which node the driver's node watch (run/nodes.py) counts it on
    batches: int = 0  # batches in the actor now (taken from Ray Data, not yet handed back)
    batch_since: float | None = None  # when the oldest of them came in; None when it holds none
    done: int = 0  # batches it handed back
    done_at: float | None = None  # when it handed back the last one
    reason: str = ""  # why it failed

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> EngineState | None:
        """The state, or None for an entry this version cannot read (never an error: it is a display)."""
        try:
            value = json.loads(raw)
            known = {name: value[name] for name in cls.__dataclass_fields__ if name in value}
            state = cls(**known)
        except (ValueError, TypeError, KeyError):
            return None
        return state if state.state in STATES else None


def _kv() -> Any:
    from ray.experimental import internal_kv

    return internal_kv


def _job_prefix(job_id: str) -> str:
    return f"{PREFIX}/{job_id}/"


class EngineReporter:
    """The caption actor's side: `starting()`, `ready()`, `batch_in()` / `batch_out()`, `failed()`, `exited()`.

    Outside a Ray actor (unit tests, a stand-in run in-process), or made with `key=""`, it reports nothing.
    `put(key, value)`, `delete(key)` and `clock` are for tests; by default the entry goes to Ray's internal
    key-value store."""

    def __init__(self, put: Callable[[str, bytes], None] | None = None, delete: Callable[[str], None] | None = None,
                 key: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._key = key if key is not None else _own_key()
        node_id = _own_node_id() if key is None else ""  # a test's reporter (a key given) stays off Ray
        self._put, self._delete = put or _kv_put, delete or _kv_del
        self._batch_starts: list[float] = []
        now = clock()
        self.current = EngineState(actor=(self._key or "").rsplit("/", 1)[-1], state=STARTING, since=now,
                                   started=now, pid=os.getpid(), node=socket.gethostname(),
                                   node_id=node_id)

    def starting(self) -> None:
        self._report(state=STARTING)

    def ready(self) -> None:
        self._report(state=READY)

    def failed(self, reason: str) -> None:
        self._report(state=FAILED, reason=reason[:300])

    def exited(self) -> None:
        """The engine is stopped: the entry goes (the pool has one engine fewer). A failed actor's entry stays
        `failed`, which is what the driver should see until Ray's replacement reports `starting`."""
        with self._lock:
            if self.current.state in (FAILED, EXITED):
                return
            self.current = replace(self.current, state=EXITED, since=self._clock())
            if self._key:
                with contextlib.suppress(Exception):
                    self._delete(self._key)

    def batch_in(self) -> None:
        with self._lock:
            self._batch_starts.append(self._clock())
            self._report_locked(self.current.state)

    def batch_out(self) -> None:
        with self._lock:
            if self._batch_starts:
                self._batch_starts.pop(0)  # the oldest: batches are about the same size, order is close enough
            self.current = replace(self.current, done=self.current.done + 1, done_at=self._clock())
            self._report_locked(self.current.state)

    def _report(self, state: str, reason: str = "") -> None:
        with self._lock:
            self._report_locked(state, reason)

    def _report_locked(self, state: str, reason: str = "") -> None:
        now = self._clock()
        since = self.current.since if state == self.current.state else now
        self.current = replace(self.current, state=state, since=since, updated=now,
                               reason=reason or self.current.reason,
                               batches=len(self._batch_starts),
                               batch_since=self._batch_starts[0] if self._batch_starts else None)
        if not self._key:
            return
        try:
            self._put(self._key, self.current.to_json())
        except Exception as err:  # the console loses a detail; the captions must not
            log.debug("could not report the engine's state: %s", err)


def _own_key() -> str | None:
    """`engines/<job id>/<actor id>` inside a Ray actor, else None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        context = ray.get_runtime_context()
        actor = context.get_actor_id()
        return _job_prefix(context.get_job_id()) + actor if actor else None
    except Exception:
        return None


def _own_node_id() -> str:
    """Ray's id of the node this process runs on, or "" outside Ray."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:
        return ""


def _kv_put(key: str, value: bytes) -> None:
    _kv()._internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)


def _kv_del(key: str) -> None:
    _kv()._internal_kv_del(key, namespace=NAMESPACE)


def read_states(job_id: str) -> list[EngineState]:
    """Every engine this job's actors reported (the driver's side); [] when nothing can be read."""
    try:
        kv = _kv()
        keys: Iterable[bytes] = kv._internal_kv_list(_job_prefix(job_id), namespace=NAMESPACE) or []
        states = []
        for key in keys:
            raw = kv._internal_kv_get(key, namespace=NAMESPACE)
            state = EngineState.from_json(raw) if raw else None
            if state is not None:
                states.append(state)
        return states
    except Exception as err:
        log.debug("could not read the engines' states: %s", err)
        return []


def clear_states(job_id: str) -> None:
    """Forget this job's entries (between passes, at the run's end)."""
    with contextlib.suppress(Exception):
        _kv()._internal_kv_del(_job_prefix(job_id), del_by_prefix=True, namespace=NAMESPACE)


def current_job_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
    except Exception:
        return None
