"""The pipeline's metrics, through `ray.util.metrics`: on every node's Prometheus endpoint, beside Ray's own.

Ray exports an application metric with a `ray_` prefix, and a counter with a `_total` suffix, so
`joycaption_pipeline_images_captioned` is scraped as `ray_joycaption_pipeline_images_captioned_total`. Every
series also carries Ray's labels (`NodeAddress`, `SessionName`, `WorkerId`, ...).

| metric (as defined) | kind | tags | from |
| --- | --- | --- | --- |
| `joycaption_pipeline_images_captioned` | counter | engine | caption actor: rows leaving it captioned |
| `joycaption_pipeline_images_failed` | counter | engine | caption actor: rows leaving it as error rows |
| `joycaption_pipeline_captions` | counter | mode, engine | caption actor: captions written (after retries) |
| `joycaption_pipeline_glitch_retries` | counter | mode, engine | caption actor: generations redone for a glitch |
| `joycaption_pipeline_requests_in_flight` | gauge | engine | caption actor: requests the engine holds now |
| `joycaption_pipeline_requests_waiting` | gauge | engine | caption actor: requests of batches waiting for room |
| `joycaption_pipeline_engine_idle_share` | gauge | engine | caption actor: share of time since ready with no request |
| `joycaption_pipeline_engine_up` | gauge | engine | caption actor: 1 while its engine is ready (sum: engines) |
| `joycaption_pipeline_shards_committed` | counter | | driver: shards committed |
| `joycaption_pipeline_commit_latency_seconds` | histogram | | driver: a shard's last row arriving to its marker |

A counter counts what a process did: an actor replaced after a failure starts again from zero and a redone
batch is counted again (Prometheus' `rate()` and `increase()` handle the resets). Outside Ray (unit tests,
benchmarks' stand-ins) every call does nothing.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pipeline.engine.metrics")

PREFIX = "joycaption_pipeline_"
# Prometheus names as Ray's endpoint serves them (a `ray_` prefix; counters end in `_total`).
EXPORTED_PREFIX = "ray_" + PREFIX
COMMIT_LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
SAMPLE_EVERY_S = 5.0  # how often an actor's gauges are refreshed (Ray exports every few seconds)

DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {  # name -> (kind, description, tag keys)
    "images_captioned": ("counter", "Images the caption actors returned captioned.", ("engine",)),
    "images_failed": ("counter", "Images the caption actors returned as error rows.", ("engine",)),
    "captions": ("counter", "Captions written, per mode (a glitch retry counts once, its final caption).",
                 ("mode", "engine")),
    "glitch_retries": ("counter", "Generations redone because the output glitched, per mode.", ("mode", "engine")),
    "requests_in_flight": ("gauge", "Requests the engine holds now.", ("engine",)),
    "requests_waiting": ("gauge", "Requests of batches waiting at the engine's gate for room.", ("engine",)),
    "engine_idle_share": ("gauge", "Share of the time since the engine was ready that it had no request.",
                          ("engine",)),
    "engine_up": ("gauge", "1 while this caption actor's engine is ready.", ("engine",)),
    "shards_committed": ("counter", "Shards committed by the driver.", ()),
    "commit_latency_seconds": ("histogram", "Seconds from a shard's last row reaching the driver to its marker.",
                               ()),
}


def _ray_running() -> bool:
    ray = sys.modules.get("ray")  # never import Ray for this: outside a Ray process there is nothing to export
    return ray is not None and ray.is_initialized()


class Metrics:
    """The metrics of one process, created on first use; every method is a no-op outside Ray."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._failed = False

    def _metric(self, name: str) -> Any | None:
        if self._failed or not _ray_running():
            return None
        with self._lock:
            if name not in self._made:
                try:
                    from ray.util import metrics

                    kind, description, tags = DEFINITIONS[name]
                    if kind == "counter":
                        made = metrics.Counter(PREFIX + name, description=description, tag_keys=tags)
                    elif kind == "gauge":
                        made = metrics.Gauge(PREFIX + name, description=description, tag_keys=tags)
                    else:
                        made = metrics.Histogram(PREFIX + name, description=description,
                                                 boundaries=COMMIT_LATENCY_BOUNDARIES, tag_keys=tags)
                except Exception as err:  # metrics are for operators; a run never fails for them
                    log.warning("metrics are off in this process: %s: %s", type(err).__name__, err)
                    self._failed = True
                    return None
                self._made[name] = made
            return self._made[name]

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None and value:
            metric.inc(value, tags=tags or None)

    def set(self, name: str, value: float, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None:
            metric.set(value, tags=tags or None)

    def observe(self, name: str, value: float, **tags: str) -> None:
        metric = self._metric(name)
        if metric is not None:
            metric.observe(value, tags=tags or None)


METRICS = Metrics()


def shard_committed(commit_s: float | None) -> None:
    """The driver committed a shard (`commit_s`: its commit latency)."""
    METRICS.inc("shards_committed")
    if commit_s is not None:
        METRICS.observe("commit_latency_seconds", commit_s)


class EngineGauges:
    """A caption actor's gauges, refreshed every `every_s` on a daemon thread from `sample()`:
    (requests in flight, requests waiting, idle share)."""

    def __init__(self, engine: str, sample: Callable[[], tuple[int, int, float]],
                 every_s: float = SAMPLE_EVERY_S) -> None:
        self.engine, self._sample, self._every_s = engine, sample, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EngineGauges:
        if _ray_running():
            METRICS.set("engine_up", 1, engine=self.engine)
            self._thread = threading.Thread(target=self._run, name="engine-gauges", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self.refresh()

    def refresh(self) -> None:
        try:
            in_flight, waiting, idle = self._sample()
        except Exception:  # the engine is going away
            return
        METRICS.set("requests_in_flight", in_flight, engine=self.engine)
        METRICS.set("requests_waiting", waiting, engine=self.engine)
        METRICS.set("engine_idle_share", round(idle, 4), engine=self.engine)

    def stop(self) -> None:
        """The engine is gone: its gauges say so (a series keeps its last value after the process ends)."""
        if self._stop.is_set():
            return
        self._stop.set()
        METRICS.set("engine_up", 0, engine=self.engine)
        METRICS.set("requests_in_flight", 0, engine=self.engine)
        METRICS.set("requests_waiting", 0, engine=self.engine)


def batch_done(engine: str, captioned: int, failed: int, per_mode: dict[str, tuple[int, int]]) -> None:
    """A caption batch left the actor: its rows captioned and failed, and per mode (captions, glitch retries)."""
    METRICS.inc("images_captioned", captioned, engine=engine)
    METRICS.inc("images_failed", failed, engine=engine)
    for mode, (captions, retries) in per_mode.items():
        METRICS.inc("captions", captions, mode=mode, engine=engine)
        METRICS.inc("glitch_retries", retries, mode=mode, engine=engine)
