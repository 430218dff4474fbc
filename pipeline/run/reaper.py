"""Ends a local Ray's processes when the run that started it dies without ending it (`kill -9`, the OOM killer).

`ray.init()` makes the GCS and the raylet die with the driver, and the workers die with the raylet, but the
dashboard and runtime-env agents do not: when the raylet dies without a SIGTERM they try to report it to the
GCS, which is gone, and wait out that call's 60 s timeout before they exit. Killing the driver left them for
a minute or more.

A run that starts a local Ray starts this small process next to it (`python -m pipeline.run.reaper PID...`,
in a session of its own so that Ctrl-C does not reach it): it keeps a list of the Ray processes below the
given ones (the processes `ray.init()` started), refreshed every `SCAN_S`, and waits on a pipe from the
driver. When the pipe closes, because the run ended (run/ray_session.py closes it after its own shutdown,
when nothing is left to kill) or because its process died, it kills every process on its list still
running, and exits. It imports nothing but psutil.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys

import psutil

SCAN_S = 2.0


def watch(roots: list[psutil.Process], pipe: int, scan_s: float = SCAN_S) -> int:
    """Keep track of `roots` and their descendants until `pipe` closes, then kill those still running;
    returns how many it killed."""
    known: dict[int, psutil.Process] = {}

    def scan() -> None:
        for root in roots:
            with contextlib.suppress(psutil.Error):
                if root.is_running():
                    known.setdefault(root.pid, root)
                    for child in root.children(recursive=True):
                        known.setdefault(child.pid, child)

    scan()
    while True:
        ready, _, _ = select.select([pipe], [], [], scan_s)
        if ready and not os.read(pipe, 4096):
            break  # the driver closed its end, or died
        scan()
    killed = 0
    for process in known.values():
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                process.kill()  # psutil refuses a pid reused by another process
                killed += 1
    return killed


def main(argv: list[str]) -> int:
    roots = []
    for pid in argv:
        with contextlib.suppress(psutil.Error, ValueError):
            roots.append(psutil.Process(int(pid)))
    watch(roots, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
