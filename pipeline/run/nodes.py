"""The cluster's nodes while a pass runs: a node lost (a spot preemption, a machine gone) or joining is said
on the console and in the log, in one line each.

Why: when a node dies, Ray recovers on its own (the caption actors that were on it are restarted on another
node, Ray Data's read and write tasks that were on it run again, and the batches the lost actors held are
sent again to their replacements), but it says so only in its own logs. On the console the run would just
slow down, and a person could not tell a preemption from a hang. So the driver watches `ray.nodes()` every
`poll_s` seconds: a node it saw alive that is now dead (or gone from the list) is one line naming the node,
how many caption engines were on it (from the engines' own reports, engine/states.py, as read at the poll
before, so an engine already moved to its replacement still counts where it was) and the batches they held:
those are redone, nothing committed is lost, and exactly once holds because a shard is committed only when
all its keys are in (run/commit.py). A node that joins afterwards is one line too (its CPUs and GPUs):
the restarted engines, or an elastic pool's new ones, can be placed there.

    node 127.0.0.1 (id 1a2b3c4d) lost: 1 caption engine on it is being replaced, its 1 batch in flight is
    redone; nothing committed is lost
    node 127.0.0.1 (id 5e6f7a8b) joined (2 CPUs)

The nodes alive at the first poll are the baseline: they are not announced. A failing `ray.nodes()` (the
GCS busy or restarting) is logged and the next poll tries again; the watch never ends a run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.engine.states import EXITED, EngineState, current_job_id, read_states

log = logging.getLogger("pipeline.run.nodes")

POLL_S = 2.0


@dataclass(frozen=True)
class NodeSeen:
    """One entry of `ray.nodes()`: Ray's node id (hex), its address, whether alive, its total resources."""

    node_id: str
    address: str
    alive: bool
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def short_id(self) -> str:
        return self.node_id[:8]

    def name(self) -> str:
        return f"node {self.address} (id {self.short_id})"

    def capacity(self) -> str:
        cpus, gpus = self.resources.get("CPU", 0), self.resources.get("GPU", 0)
        parts = [_count(cpus, "CPU")] + ([_count(gpus, "GPU")] if gpus else [])
        return ", ".join(parts)


def ray_nodes() -> list[NodeSeen]:
    """Every node the GCS knows, dead ones included (the driver's Ray must be initialised)."""
    import ray

    return [node_of(entry) for entry in ray.nodes()]


def node_of(entry: dict[str, Any]) -> NodeSeen:
    return NodeSeen(str(entry.get("NodeID", "")), str(entry.get("NodeManagerAddress", "?")),
                    bool(entry.get("Alive")), dict(entry.get("Resources") or {}))


def current_engines() -> list[EngineState]:
    """The engines this run's caption actors reported (engine/states.py); [] outside Ray."""
    job_id = current_job_id()
    return read_states(job_id) if job_id else []


@dataclass(frozen=True)
class Change:
    """What one poll found: nodes lost since the last one, nodes that joined."""

    lost: list[NodeSeen]
    joined: list[NodeSeen]


def diff(known: dict[str, NodeSeen], now: Iterable[NodeSeen]) -> Change:
    """Against `known` (the nodes seen alive): those now dead or gone are lost, alive ones not known joined."""
    now_alive = {node.node_id: node for node in now if node.alive}
    lost = [node for node_id, node in known.items() if node_id not in now_alive]
    joined = [node for node_id, node in now_alive.items() if node_id not in known]
    return Change(lost, joined)


@dataclass(frozen=True)
class EnginesOn:
    """The caption engines a node held when last read, and the batches they held."""

    engines: int = 0
    batches: int = 0


def engines_by_node(states: Sequence[EngineState]) -> dict[str, EnginesOn]:
    """The engines (not exited) per Ray node id; an engine that did not report its node is left out."""
    found: dict[str, EnginesOn] = {}
    for state in states:
        if state.node_id and state.state != EXITED:
            held = found.get(state.node_id, EnginesOn())
            found[state.node_id] = EnginesOn(held.engines + 1, held.batches + state.batches)
    return found


def lost_line(node: NodeSeen, on_it: EnginesOn | None) -> str:
    """The console's line for a lost node: what it held, and what that costs."""
    if on_it is None:  # the engines' reports could not be read (or were never made: a stand-in captioner)
        return (f"{node.name()} lost: any caption engine on it is being replaced and its work in flight is "
                "redone; nothing committed is lost")
    if not on_it.engines:
        return (f"{node.name()} lost: no caption engine was on it; its read and write tasks in flight are "
                "redone; nothing committed is lost")
    engines = _count(on_it.engines, "caption engine")
    verb = "is" if on_it.engines == 1 else "are"
    batches = _count(on_it.batches, "batch", "batches")
    held = f"its {batches} in flight {'is' if on_it.batches == 1 else 'are'} redone"
    return f"{node.name()} lost: {engines} on it {verb} being replaced, {held}; nothing committed is lost"


def joined_line(node: NodeSeen) -> str:
    return f"{node.name()} joined ({node.capacity()})"


class NodeWatch:
    """`start()` / `stop()` around each pass of a run (or `with NodeWatch():`); `poll()` is one look.

    `nodes` lists the cluster's nodes (default `ray.nodes()`), `engines` the engines' reports (default the
    run's job's, engine/states.py), or None where the engines are not known per node."""

    def __init__(self, nodes: Callable[[], Iterable[NodeSeen]] = ray_nodes,
                 engines: Callable[[], Sequence[EngineState]] | None = current_engines,
                 poll_s: float = POLL_S) -> None:
        self._nodes, self._engines, self.poll_s = nodes, engines, poll_s
        self.known: dict[str, NodeSeen] | None = None  # None until the first poll (the baseline)
        self.lost: list[NodeSeen] = []
        self.joined: list[NodeSeen] = []
        self._on_nodes: dict[str, EnginesOn] | None = None  # at the poll before
        self._failing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        """One look at the nodes; returns the lines said (each logged: lost as a warning, joined as info)."""
        try:
            nodes = list(self._nodes())
        except Exception as err:  # the GCS is busy or restarting: look again next time
            self._say_failing(err)
            return []
        self._failing = False
        if self.known is None:
            self.known = {node.node_id: node for node in nodes if node.alive}
            self._on_nodes = self._read_engines()
            return []
        change = diff(self.known, nodes)
        lines = [self._lose(node) for node in change.lost] + [self._join(node) for node in change.joined]
        self._on_nodes = self._read_engines()
        return lines

    def _lose(self, node: NodeSeen) -> str:
        assert self.known is not None
        del self.known[node.node_id]
        self.lost.append(node)
        on_it = None if self._on_nodes is None else self._on_nodes.get(node.node_id, EnginesOn())
        line = lost_line(node, on_it)
        log.warning(line)
        return line

    def _join(self, node: NodeSeen) -> str:
        assert self.known is not None
        self.known[node.node_id] = node
        self.joined.append(node)
        line = joined_line(node)
        log.info(line)
        return line

    def _read_engines(self) -> dict[str, EnginesOn] | None:
        if self._engines is None:
            return None
        try:
            states = self._engines()
        except Exception as err:
            log.debug("could not read the engines' states: %s: %s", type(err).__name__, err)
            return None
        if not any(state.node_id for state in states):  # none reported yet, or none says its node
            return None
        return engines_by_node(states)

    def _say_failing(self, err: Exception) -> None:
        if not self._failing:  # once per stretch of failures, not every poll
            log.info("could not list the cluster's nodes (%s: %s); trying again", type(err).__name__, err)
        self._failing = True

    def start(self) -> NodeWatch:
        """Watch on a daemon thread until `stop()`; a watch started again (the next pass) goes on from what
        it knew, so a node lost between two passes is said at the next one's first look."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="node-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as err:  # a display must never end a run
                log.debug("node watch: %s: %s", type(err).__name__, err)
            if self._stop.wait(self.poll_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def __enter__(self) -> NodeWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _count(value: float, singular: str, plural: str | None = None) -> str:
    return f"{value:g} {singular if value == 1 else (plural or singular + 's')}"
