"""A run with a paced stand-in for the caption actor, recording the progress line as the console would draw it.

    python -m tests.integration.standin_run INPUT OUTPUT IMAGES_PER_S

The stand-in (the benchmark's instant captioner, slowed to IMAGES_PER_S like an engine) makes the run's true
rate known and steady without an engine; the display samples `Progress.line()` every 0.1 s (a console draws
once a second) and prints one JSON object per line it saw change: {"t": seconds since the start, "line": ...}.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from bench.bench_machinery import InstantCaptioner


class PacedCaptioner(InstantCaptioner):
    """Captions a batch in the time an engine at `PACE` images/s would take."""

    PACE = 40.0

    def __call__(self, batch: Any) -> Any:
        time.sleep(batch.num_rows / self.PACE)
        return super().__call__(batch)


class Recorder:
    """A display for `execute`: samples the progress line every 0.1 s, prints each new one as JSON."""

    def __init__(self, progress: Any) -> None:
        self.progress, self.started = progress, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._say(self.progress.line())

    def _run(self) -> None:
        last = ""
        while not self._stop.wait(0.1):
            line = self.progress.line()
            if line != last:
                self._say(line)
                last = line

    def _say(self, line: str) -> None:
        print(json.dumps({"t": round(time.monotonic() - self.started, 2), "line": line}), flush=True)


def main(argv: list[str]) -> int:
    from pipeline.config import build_config
    from pipeline.run.driver import execute

    source, target, pace = argv[0], argv[1], float(argv[2])
    PacedCaptioner.PACE = pace  # run as __main__, the class travels to the actor by value, its pace with it
    config = build_config({"input": {"uri": source, "shard_size": 64}, "output": {"uri": target},
                           "model": {"path": "unused-by-the-stand-in"}, "modes": "dual",
                           "compute": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 16}})
    summary = execute(config, overwrite=True, allow_existing=True, captioner=PacedCaptioner, display=Recorder)
    print(json.dumps({"images": summary.images}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
