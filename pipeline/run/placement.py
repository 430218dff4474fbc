"""How many engines a pass asks for, whether the cluster can place them, and a watch that says so.

    plan_engines(config, nodes)  -> EnginePlan: fewest and most engines, and what each one needs
    diagnose(plan, nodes, ...)   -> None, or which resource is missing ("missing CPU: ...")
    PlacementWatch               while a pass runs: says what is missing on the console within seconds, and
                                 fails the pass in one line when it stays so past compute.placement_timeout_s

**Engines** (`compute.actors`). A count is a fixed pool. A range `LOW..HIGH` is Ray Data's autoscaling pool
(`ActorPoolStrategy(min_size=LOW, max_size=HIGH)`): the pass starts as soon as one engine is ready, and Ray Data
adds engines while the work queued for them outgrows those running and the cluster has room for another (a
node that joins mid-run is used). `auto` is `1..N`: on GPU clusters N has no ceiling but the GPUs themselves
(every GPU group the cluster has or gains runs an engine); on CPU clusters N is the number of nodes with
`compute.cpus_per_actor` CPUs when the pass starts, one engine per node, since a CPU engine computes on every
core of its node and a second one there would only share them. Unset, it is one engine per GPU group the
cluster has at start (`GPUs // gpus_per_actor`), or one on a CPU cluster, as before.

**Placement.** The check is made on the cluster's alive nodes and their total resources (`ray.nodes()`): can
the fewest engines be placed, node by node (each needs `cpus_per_actor` CPUs, `gpus_per_actor` GPUs and,
with `compute.accelerator_type`, a GPU of that kind), with CPU left on some node for a read task
(`decode_cpus`)? When not, the console says which resource is missing at once, then every minute; a node that
joins clears it. If nothing is captioned while it lasts `compute.placement_timeout_s`, the pass fails with
the same line. Resources other jobs hold are not counted (they are free again when those jobs end), and a
pass that captions meanwhile (some engines placed) is never failed by the watch.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig

log = logging.getLogger("pipeline.run.placement")

EPSILON = 1e-6  # Ray resources are fixed-point; 0.1 * 3 must fit 0.3


class PlacementError(RuntimeError):
    """The pass's engines and read tasks could not all find resources within compute.placement_timeout_s."""


@dataclass(frozen=True)
class NodeResources:
    """An alive node: its address and its total resources (Ray's names: CPU, GPU, accelerator_type:H100, ...)."""

    address: str
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))

    def accelerator_types(self) -> list[str]:
        return sorted(name.split(":", 1)[1] for name in self.resources if name.startswith("accelerator_type:"))


def cluster_nodes() -> list[NodeResources]:
    """The cluster's alive nodes, from Ray's GCS (the driver's Ray must be initialised)."""
    import ray

    return [NodeResources(str(node.get("NodeManagerAddress", "?")), dict(node.get("Resources") or {}))
            for node in ray.nodes() if node.get("Alive")]


@dataclass(frozen=True)
class EnginePlan:
    """The caption actors of a pass: at least `fewest`, at most `most` (None: as many as the GPUs allow),
    each with `cpus` CPUs, `gpus` GPUs and, if set, a GPU of `accelerator_type`."""

    fewest: int
    most: int | None
    gpus: float
    cpus: float
    accelerator_type: str | None = None

    @property
    def elastic(self) -> bool:
        return self.most != self.fewest

    def describe(self) -> str:
        if not self.elastic:
            return f"{self.fewest} engine{'s' if self.fewest != 1 else ''}"
        if self.most is None:
            return f"{self.fewest} engine{'s' if self.fewest != 1 else ''} and more as GPUs appear"
        return f"{self.fewest} to {self.most} engines"

    def needs(self) -> str:
        parts = [f"{self.cpus:g} CPU"] + ([f"{self.gpus:g} GPU"] if self.gpus else [])
        kind = f" ({self.accelerator_type})" if self.accelerator_type and self.gpus else ""
        return " and ".join(parts) + kind


def plan_engines(config: RunConfig, nodes: list[NodeResources]) -> EnginePlan:
    """The pass's engines from `compute.actors` and the cluster's nodes now (see the module docstring)."""
    compute = config.compute
    gpus = sum(node.gpus for node in nodes)
    per_actor = compute.gpus_per_actor
    if per_actor is None:
        per_actor = float(config.model.tensor_parallel_size) if gpus else 0.0
    if config.engine.kind == "openai":  # a client of a server (engine/remote.py): no GPU wanted
        per_actor = 0.0
    bounds = compute.actor_bounds()
    if bounds is not None:
        fewest, most = bounds
    elif compute.actors == "auto":
        if per_actor:
            fewest, most = 1, None
        else:  # one CPU engine per node that can hold one
            fewest, most = 1, max(1, sum(1 for node in nodes if node.cpus + EPSILON >= compute.cpus_per_actor))
    else:
        fewest = most = max(1, int(gpus // per_actor)) if per_actor else 1
    return EnginePlan(fewest, most, per_actor, compute.cpus_per_actor, compute.accelerator_type)


def _engines_on(node: NodeResources, plan: EnginePlan, cpus_taken: float = 0.0) -> int:
    """How many engines `node` holds (with `cpus_taken` of its CPUs kept for something else)."""
    if plan.accelerator_type and plan.gpus and not node.resources.get(f"accelerator_type:{plan.accelerator_type}"):
        return 0
    cpus = node.cpus - cpus_taken
    count = math.floor(cpus / plan.cpus + EPSILON) if plan.cpus > 0 else 10**9
    if plan.gpus > 0:
        count = min(count, math.floor(node.gpus / plan.gpus + EPSILON))
    return max(0, count)


def _per_node(nodes: list[NodeResources], what: Callable[[NodeResources], float]) -> str:
    return ", ".join(f"{node.address}: {what(node):g}" for node in nodes) or "no node"


def diagnose(plan: EnginePlan, nodes: list[NodeResources], read_cpus: float) -> str | None:
    """Which resource keeps the pass from running, in one line starting `missing <resource>`; None when the
    fewest engines and a read task fit the cluster's nodes."""
    one = plan.fewest == 1
    count = f"{plan.fewest} engine{'' if one else 's'}"
    need, take, each = ("needs", "takes", "") if one else ("need", "take", " each")
    if sum(_engines_on(node, plan) for node in nodes) < plan.fewest:
        if plan.gpus > 0:
            if plan.accelerator_type:
                kinds = sorted({kind for node in nodes for kind in node.accelerator_types()})
                holding = [node for node in nodes if f"accelerator_type:{plan.accelerator_type}" in node.resources]
                if sum(math.floor(node.gpus / plan.gpus + EPSILON) for node in holding) < plan.fewest:
                    return (f"missing GPU of type {plan.accelerator_type}: {count} {need} {plan.gpus:g} GPU{each} "
                            f"of type {plan.accelerator_type} (compute.accelerator_type); the cluster's GPUs are "
                            f"{', '.join(kinds) or 'none'} ({sum(node.gpus for node in holding):g} of that type)")
            elif sum(math.floor(node.gpus / plan.gpus + EPSILON) for node in nodes) < plan.fewest:
                total = sum(node.gpus for node in nodes)
                return (f"missing GPU: {count} {need} {plan.gpus:g} GPU{each} (compute.gpus_per_actor); the cluster "
                        f"has {total:g} GPU{'s' if total != 1 else ''} ({_per_node(nodes, lambda n: n.gpus)}): "
                        "waiting for a GPU node to join")
        return (f"missing CPU: {count} {need} {plan.cpus:g} CPU{each} (compute.cpus_per_actor); the cluster's nodes "
                f"have {_per_node(nodes, lambda n: n.cpus)} CPU")
    # The engines fit; then some node must keep `read_cpus` for a read task beside them.
    for reader in nodes:
        if reader.cpus + EPSILON < read_cpus:
            continue
        others = sum(_engines_on(node, plan) for node in nodes if node is not reader)
        if others + _engines_on(reader, plan, cpus_taken=read_cpus) >= plan.fewest:
            return None
    total = sum(node.cpus for node in nodes)
    return (f"missing CPU beside the engines: {count} {take} {plan.cpus:g} CPU{each} (compute.cpus_per_actor) and no "
            f"node has {read_cpus:g} CPU left for a read task (compute.decode_cpus); the cluster has {total:g} CPU "
            f"({_per_node(nodes, lambda n: n.cpus)}): add a node, or lower compute.cpus_per_actor")


class PlacementWatch:
    """While a pass runs: `check()` every `poll_s` on a daemon thread (see the module docstring). When the
    pass must fail, PlacementError is raised in the pass's thread (`thread_id`), which Ray Data's iterator
    polls, so it surfaces within a few milliseconds and the pass ends through its usual clean-up."""

    def __init__(self, plan: EnginePlan, read_cpus: float, timeout_s: float, progressed: Callable[[], int],
                 nodes: Callable[[], list[NodeResources]] = cluster_nodes, thread_id: int | None = None,
                 poll_s: float = 5.0, say_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.plan, self.read_cpus, self.timeout_s = plan, read_cpus, timeout_s
        self._progressed, self._nodes, self._clock = progressed, nodes, clock
        self.thread_id = thread_id if thread_id is not None else threading.get_ident()
        self.poll_s, self.say_every_s = poll_s, say_every_s
        self.problem: str | None = None
        self.failure: str | None = None
        self._since: float | None = None  # when the current stretch of "cannot place, nothing captioned" began
        self._said = 0.0
        self._seen = progressed()
        self._partial_said = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # after stop() returns, nothing is raised in the pass's thread
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """One look: log what is missing, and return the failure line once it has lasted the timeout."""
        try:
            problem = diagnose(self.plan, self._nodes(), self.read_cpus)
        except Exception as err:  # the GCS is busy: look again next time
            log.debug("placement check failed: %s: %s", type(err).__name__, err)
            return None
        now, seen = self._clock(), self._progressed()
        moved, self._seen = seen != self._seen, seen
        if problem is None:
            if self.problem is not None:
                log.warning("resources found: the run can be placed now")
            self.problem, self._since = None, None
            return None
        self.problem = problem
        if moved:  # captions arrive: some engines run. Say once that the rest cannot be placed; no failure for it
            if not self._partial_said:
                self._partial_said = True
                log.warning("not every engine can be placed (%s); the run goes on with those it has", problem)
            self._since = None
            return None
        if self._since is None:
            self._since, self._said = now, now
            log.warning("waiting for resources: %s (the run fails if this lasts %s: compute.placement_timeout_s)",
                        problem, _seconds(self.timeout_s))
        elif now - self._said >= self.say_every_s:
            self._said = now
            log.warning("still waiting for resources after %s: %s", _seconds(now - self._since), problem)
        if now - self._since >= self.timeout_s:
            waited = _seconds(now - self._since)
            return f"cannot place the run: {problem}; waited {waited} (compute.placement_timeout_s)"
        return None

    def start(self) -> PlacementWatch:
        self._thread = threading.Thread(target=self._run, name="placement-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            failure = self.check()
            if failure is not None:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self.failure = failure
                    raise_in_thread(self.thread_id, failure)
                return
            if self._stop.wait(self.poll_s):
                return

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def raise_in_thread(thread_id: int, message: str) -> bool:
    """Raise PlacementError(message) in thread `thread_id` the next time it runs Python code."""
    error: Any = type("PlacementError", (PlacementError,), {
        "__init__": lambda self, *args: PlacementError.__init__(self, *(args or (message,)))})
    error.__module__ = PlacementError.__module__
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(error))
    return done == 1


def _seconds(value: float) -> str:
    return f"{value:.0f} s"
