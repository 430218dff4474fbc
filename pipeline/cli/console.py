"""The console of `pipeline run`: the pipeline's own lines for people; everything else in a log file.

A run's process is loud: Ray Data's progress blocks, Ray's forwarded worker logs, vLLM's config dumps
and warnings. Rather than silence each library (they change between releases), the process's own
stdout and stderr (file descriptors 1 and 2, so C extensions and Ray's log forwarding too) go to the
log file, and the console writes to copies of the original ones. The pipeline's log records still
reach the console from INFO up (warnings that matter, plan and growth notes), except the chatty ones
that only the log needs. With `-v` nothing is redirected and every log line shows.

The progress display is a live line on a terminal; otherwise (a Ray job's logs, CI) a plain line at once
when the run moves on (engines ready, the first captions) and a heartbeat line every `line_every_s`
seconds even when nothing changed, saying what the run waits for (run/progress.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from pipeline.run.progress import Progress

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers whose INFO lines are for the log only (progress is drawn by the display, commits are many).
LOG_ONLY = ("pipeline.run.progress", "pipeline.run.commit", "pipeline.engine.actor", "pipeline.engine.loop",
            "pipeline.table.ledger", "pipeline.run.ray_session", "pipeline.run.engines", "pipeline.engine.states")


def default_log_path(output_uri: str) -> Path:
    """A local file per run: $PIPELINE_LOG_DIR, else the XDG state folder; named after the output."""
    root = os.environ.get("PIPELINE_LOG_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "joycaption-pipeline", "logs")
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in output_uri.rstrip("/").split("/")[-1]) or "run"
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}-{os.getpid()}.log"


class _ConsoleFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pipeline.trace":  # tracebacks the console sums up in one line
            return False
        return record.levelno >= logging.WARNING or not record.name.startswith(LOG_ONLY)


class Console:
    """Where a run's lines go. Use as a context manager around the run."""

    def __init__(self, log_path: Path | None, verbose: bool = False, line_every_s: float = 30.0) -> None:
        self.verbose = verbose
        self.log_path = log_path
        self.line_every_s = line_every_s
        self._saved: list[int] = []
        self.out: IO[str] = sys.stdout
        self.err: IO[str] = sys.stderr
        self.live = False
        self._lock = threading.Lock()
        self._bar_width = 0
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> Console:
        if self.verbose or self.log_path is None:
            self._log_to(logging.StreamHandler(sys.stderr), logging.DEBUG if self.verbose else logging.INFO)
            self.live = sys.stderr.isatty()
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = [os.dup(1), os.dup(2)]
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.live = self.err.isatty()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        file_handler = logging.StreamHandler(sys.stderr)  # fd 2 is the log file now
        self._log_to(file_handler, logging.INFO)
        console = logging.StreamHandler(self)  # type: ignore[arg-type]  # write() below
        console.addFilter(_ConsoleFilter())
        console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        console.setLevel(logging.INFO)
        logging.getLogger("pipeline").addHandler(console)
        self._handlers.append(console)
        return self

    def _log_to(self, handler: logging.Handler, level: int) -> None:
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root = logging.getLogger()
        root.setLevel(level)
        root.addHandler(handler)
        self._handlers.append(handler)

    def __exit__(self, *exc: object) -> None:
        self.clear_bar()
        for handler in self._handlers:
            for logger in (logging.getLogger(), logging.getLogger("pipeline")):
                logger.removeHandler(handler)
        self._handlers = []
        if self._saved:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(self._saved[0], 1)
            os.dup2(self._saved[1], 2)
            for fd in self._saved:
                os.close(fd)
            self._saved = []
            with contextlib.suppress(Exception):
                self.out.close()
                self.err.close()

    # The console handler writes through here, so a log line never lands in the middle of the live bar.
    def write(self, text: str) -> None:
        self.say(text.rstrip("\n"))

    def flush(self) -> None:
        self.err.flush()

    def say(self, line: str) -> None:
        """A line for people, on stderr (stdout is kept for the summary and --json)."""
        with self._lock:
            self._clear_locked()
            self.err.write(line + "\n")
            self.err.flush()

    def result(self, text: str) -> None:
        self.clear_bar()
        self.out.write(text + "\n")
        self.out.flush()

    def bar(self, line: str) -> None:
        with self._lock:
            padded = line.ljust(self._bar_width)
            self._bar_width = len(line)
            self.err.write("\r" + padded)
            self.err.flush()

    def clear_bar(self) -> None:
        with self._lock:
            self._clear_locked()

    def _clear_locked(self) -> None:
        if self._bar_width:
            self.err.write("\r" + " " * self._bar_width + "\r")
            self._bar_width = 0


class ProgressDisplay:
    """Draws the progress: on a terminal a live line redrawn every second; otherwise plain lines, one at once
    when the run moves on (engines ready, the first captions, an engine failing: `Progress.phase_key`) and
    one every `line_every_s` in between even when nothing changed (a heartbeat: the line then says what the
    run waits for, see run/progress.py)."""

    def __init__(self, console: Console, progress: Progress, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.progress, self.poll_s, self.clock = console, progress, poll_s, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-display", daemon=True)
        self._last_said: float | None = None
        self._last_key: tuple[object, ...] | None = None

    def __enter__(self) -> ProgressDisplay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.console.clear_bar()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a display must never end a run
                self.draw()
            if self._stop.wait(self.poll_s):
                return

    def draw(self) -> None:
        """One tick: redraw the live line, or print a plain line when one is due."""
        if self.console.live:
            self.console.bar(self.progress.line())
            return
        now, key = self.clock(), self.progress.phase_key()
        if self._last_said is None or key != self._last_key or now - self._last_said >= self.console.line_every_s:
            self._last_said, self._last_key = now, key
            self.console.say(self.progress.line())
