"""The Ray a run works in: joined, or started on this machine, and ended with the run, so that no process of
the run outlives it.

`start` joins `compute.ray_address` (or `RAY_ADDRESS`) when one is given, else starts a local Ray of this
run's own (`address="local"`: never a `ray start` cluster that happens to run on the same machine). A Ray
the caller had initialised already is the caller's: `start` uses it and `end` leaves it alone.

`end`, on every exit path of a run (done, failed, Ctrl-C, SIGTERM): `ray.shutdown()`. On a cluster that
disconnects the driver, and Ray ends the run's actors with it (an actor's fate is its owner's, the driver).
A local Ray is this run's processes: the GCS, the raylet, the dashboard head, the log monitor and the
autoscaler monitor (children of the driver, `ray.init` starts them); the dashboard and runtime-env agents
(the raylet's children); every worker (Ray Data's own actors, the read and write tasks' workers, the caption
actors with their engines). `ray.shutdown()` stops the GCS and the raylet and returns; the workers and
agents then stop on their own, a caption actor only once its engine has shut down, which took about 20 s
after the driver had exited on a loaded machine. So `end` waits for every one of those processes (taken
at the start and again before the shutdown) for up to `END_WAIT_S`, and kills what is left (the caption
actors, as a rule: said in the log). Should the
driver itself be killed (`kill -9`), the reaper it started with the local Ray (run/reaper.py) ends them.

Why a local Ray gets `_system_config`: see `local_system_config`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import RunConfig

log = logging.getLogger("pipeline.run.ray_session")

# Then what is left is killed: the raylet's and GCS's ends are waited for by ray.shutdown(), idle workers and the
# agents stop within a second, and a caption actor would take up to 20 s to stop an engine the run no longer
# needs (killing it frees a GPU's memory as surely: its engine processes are on the list too).
END_WAIT_S = 2.0

# Ray keeps a worker process per running task and, by default, kills an idle one after 1 s whenever more
# workers are registered than the node has CPUs (`num_workers_soft_limit`, default: the CPU count). Actors
# count too: on a 2-CPU node a run already holds four (the caption actor and Ray Data's stats, autoscaling
# and actor-location actors), so every read or write task's worker was killed a second after its task, and
# the raylet then started a new one for the next task (it also prestarts workers for tasks waiting on CPU,
# which then idled and were killed in turn). Each new worker is a Python interpreter importing Ray, the
# pipeline, pyarrow and Pillow: CPU taken from decoding and the engine. With a limit of 4 workers per CPU
# (a read task takes a quarter of one), at least 16, the workers of the read and write tasks are kept and
# reused; an idle one is still removed, after a minute, once the node has more than that. Only for a local
# Ray this run starts: a cluster keeps its own settings (RAY_num_workers_soft_limit and
# RAY_idle_worker_killing_time_threshold_ms in the environment of `ray start` on each node).
WORKERS_PER_CPU = 4
MIN_WORKERS = 16
IDLE_WORKER_KEPT_MS = 60_000


def local_system_config(num_cpus: float | None) -> dict[str, Any]:
    """Ray's settings for a local Ray a run starts (`num_cpus`: compute.num_cpus, None for every core)."""
    cpus = num_cpus or os.cpu_count() or 1
    return {"num_workers_soft_limit": max(MIN_WORKERS, int(WORKERS_PER_CPU * cpus)),
            "idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEPT_MS}


@dataclass
class _Session:
    local: bool
    processes: list[Any] = field(default_factory=list)  # psutil.Process of a local Ray, taken at the start
    reaper: subprocess.Popen[bytes] | None = None  # run/reaper.py: ends them should this process be killed


_session: _Session | None = None
_lock = threading.Lock()


def start(config: RunConfig, worker_setup: Callable[[], None] | None) -> None:
    """Join or start Ray for a run (once per process; see the module's docstring)."""
    global _session
    import ray

    with _lock:
        if ray.is_initialized():
            return
        # Ray's driver installs a SIGTERM handler of its own; the run's (cli: one line, exit 143) stays.
        on_sigterm = signal.getsignal(signal.SIGTERM)
        address = config.compute.ray_address or os.environ.get("RAY_ADDRESS")
        runtime_env = {"worker_process_setup_hook": worker_setup} if worker_setup is not None else None
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
            _session = _Session(local=False)
        else:
            before = {child.pid for child in _children()}
            ray.init(address="local", num_cpus=config.compute.num_cpus, include_dashboard=False, log_to_driver=True,
                     runtime_env=runtime_env, _system_config=local_system_config(config.compute.num_cpus))
            started = [child for child in _children() if child.pid not in before]
            _session = _Session(local=True, processes=_with_descendants(started), reaper=_start_reaper(started))
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the pipeline draws its own (cli/console.py)


def owns_ray() -> bool:
    """Whether `start` started or joined the Ray this process is connected to (and `end` will end it)."""
    return _session is not None


def end(wait_s: float = END_WAIT_S) -> None:
    """Shut down the Ray `start` began, and wait for a local Ray's processes to be gone (killing what is left
    after `wait_s`). Nothing when the caller had initialised Ray, or when it is already ended."""
    global _session
    import ray

    with _lock:
        session, _session = _session, None
        if session is None:
            return
        processes = _with_descendants(session.processes) if session.local else []
        try:
            ray.shutdown()
        except Exception as err:  # the processes are ended below all the same
            log.warning("ray.shutdown() failed: %s", err)
        if processes:
            _reap(processes, wait_s)
        if session.reaper is not None:  # nothing left for it to kill: closing its pipe ends it
            with contextlib.suppress(Exception):
                session.reaper.stdin.close()  # type: ignore[union-attr]
                session.reaper.wait(timeout=5)


def _start_reaper(roots: list[Any]) -> subprocess.Popen[bytes] | None:
    """run/reaper.py, watching the processes `ray.init()` started (its own session: Ctrl-C does not reach it)."""
    import pipeline

    if not roots:
        return None
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(pipeline.__file__)))
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    try:
        return subprocess.Popen([sys.executable, "-m", "pipeline.run.reaper", *(str(p.pid) for p in roots)],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": path})
    except OSError as err:  # the run goes on; only a killed driver would leave the agents for a minute
        log.warning("could not start the reaper of the local Ray's processes: %s", err)
        return None


def _children() -> list[Any]:
    import psutil

    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def _with_descendants(processes: list[Any]) -> list[Any]:
    """`processes` and every process below them that still runs (psutil.Process objects, by pid and start time,
    so a reused pid is never mistaken for one of them)."""
    import psutil

    found: dict[int, Any] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running():
                found[process.pid] = process
            for child in process.children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(processes: list[Any], wait_s: float) -> None:
    """Wait up to `wait_s` for `processes` to exit, then kill the rest; reap those that are this process's
    children (the GCS, the raylet, ...), so none is left a zombie."""
    import psutil

    deadline = time.monotonic() + wait_s
    alive = [process for process in processes if _running(process)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [process for process in alive if _running(process)]
    if alive:
        log.info("killing %d processes of the run's Ray still running %.0f s after it was shut down: %s",
                    len(alive), wait_s, ", ".join(f"{_name(p)} (pid {p.pid})" for p in alive[:8]))
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
    mine = os.getpid()
    for process in processes:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if process.ppid() == mine:
                process.wait(timeout=2)
    deadline = time.monotonic() + 3
    while any(_running(p) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.05)


def _name(process: Any) -> str:
    try:
        return str(process.name())
    except Exception:
        return "?"
