"""The run's Ray: its settings against worker churn, and ending every process of a local Ray with the run."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from pipeline.run import ray_session


def test_a_local_ray_keeps_its_task_workers():
    """Ray's default kills an idle worker after 1 s once a node has more workers than CPUs, which a run's actors
    alone exceed on a small node: the local Ray a run starts allows 4 workers per CPU and keeps idle ones a
    minute."""
    assert ray_session.local_system_config(2) == {"num_workers_soft_limit": 16,
                                                  "idle_worker_killing_time_threshold_ms": 60_000}
    assert ray_session.local_system_config(96)["num_workers_soft_limit"] == 384


def test_processes_that_outlive_the_wait_are_killed_and_reaped():
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); time.sleep(60)"])
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    processes = [psutil.Process(stubborn.pid), psutil.Process(quick.pid)]
    started = time.monotonic()
    ray_session._reap(processes, wait_s=0.5)
    assert time.monotonic() - started < 10
    assert stubborn.poll() is not None and quick.poll() is not None  # both gone, neither left a zombie


def test_without_a_session_ending_does_nothing():
    assert not ray_session.owns_ray()
    ray_session.end()  # the caller's Ray, or none: left alone


def test_the_reaper_kills_what_is_left_once_its_pipe_closes():
    """A killed driver closes the reaper's pipe: the reaper then kills the processes it watched (here a stand-in
    for the raylet and a child of it that, like Ray's agents, would outlive it)."""
    tree = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, "
                             "'-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    root = psutil.Process(tree.pid)
    child = None
    deadline = time.monotonic() + 30
    while child is None:
        assert time.monotonic() < deadline, "the child process never started"
        child = next(iter(root.children()), None)
        time.sleep(0.05)
    reaper = subprocess.Popen([sys.executable, "-m", "pipeline.run.reaper", str(tree.pid)], stdin=subprocess.PIPE)
    time.sleep(1)  # it has scanned the tree
    reaper.stdin.close()  # type: ignore[union-attr]
    assert reaper.wait(timeout=30) == 0
    assert tree.wait(timeout=10) is not None
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive
