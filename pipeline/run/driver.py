"""One run: take the output's lease, plan, build the Ray Data graph, commit shards as they complete, summarise.

    lease (lease.py) -> plan (planning.py, driver, streamed) -> from_items(pending shard ids)
      -> read + decode + prepare       [CPU tasks, stages.py: a bounded batch at a time]
      -> CaptionActor                  [actor pool, engine.py: one vLLM engine each]
      -> write fragments               [CPU tasks, stages.py: off the actor's hot loop]
      -> driver: commit a shard when all its images have arrived (commit.py: merge, check, part, marker)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from pipeline.config import RunConfig
from pipeline.config.limits import MAX_PASSES, READ_TASK_RETRIES
from pipeline.engine.actor import CaptionActor
from pipeline.engine.dedup import start_index, stop_index
from pipeline.engine.options import ENGINE_COLUMN
from pipeline.engine.remote import remote_batches_in_flight, remote_captioner
from pipeline.engine.weights import check_remote_model
from pipeline.io.fs import TransientStorageError
from pipeline.run import ray_session
from pipeline.run.commit import Committer
from pipeline.run.engines import EngineWatch
from pipeline.run.hooks import NO_HOOKS, RunHooks
from pipeline.run.nodes import NodeWatch
from pipeline.run.placement import EnginePlan, PlacementWatch, cluster_nodes, plan_engines
from pipeline.run.planning import prepare_output
from pipeline.run.progress import Progress
from pipeline.run.records import CommitStats, RunSummary, WorkItem, work_rows
from pipeline.run.redo import Selection
from pipeline.run.stages import read_and_prepare, write_stage
from pipeline.table.lease import LeaseInfo, OutputLease
from pipeline.table.ledger import Ledger
from pipeline.table.manifest import RunMetadata
from pipeline.table.records import Marker, Totals, WriteReport

log = logging.getLogger("pipeline.run.driver")


def _init_ray(config: RunConfig, worker_setup: Callable[[], None] | None) -> None:
    """Join compute.ray_address, or start a local Ray of the run's own; `execute` ends it on every exit path
    so that no process of the run outlives it (run/ray_session.py)."""
    ray_session.start(config, worker_setup)


def _actor_resources(config: RunConfig) -> EnginePlan:
    """The pass's engines (fewest, most, GPUs and CPUs each) from compute.actors and the cluster's nodes now:
    a count, a range, `auto`, or unset (one engine per GPU group on GPU clusters, else one CPU engine);
    run/placement.py says how each is derived."""
    return plan_engines(config, cluster_nodes())


# The most requests a GPU engine schedules by default (vLLM's max_num_seqs for offline use on H100-class
# GPUs); smaller GPUs get a lower limit from vLLM, and the extra batches then wait at the actor's gate.
GPU_REQUESTS_IN_FLIGHT = 1024


def batches_in_flight(config: RunConfig, gpus_per_actor: float) -> int:
    """Batches Ray Data hands each actor at once: enough to keep the engine's target of requests in flight,
    plus one, so a batch waiting on its last long caption never leaves the engine short.

    On a GPU the target is `compute.requests_in_flight` or `model.max_num_seqs`, else vLLM's default for
    the device (the actor learns the exact figure; the driver sizes for the largest). On CPU it is one: a
    CPU engine is compute-bound and a bigger batch only makes each step slower (measured: 160 images on 2
    cores, 107.6 s with 1 against 113.5 s with 2)."""
    if config.compute.batches_in_flight is not None:
        return config.compute.batches_in_flight
    if config.engine.kind == "openai":
        return remote_batches_in_flight(config)
    if gpus_per_actor <= 0:
        return 1
    target = config.compute.requests_in_flight or config.model.max_num_seqs or GPU_REQUESTS_IN_FLIGHT
    per_batch = config.compute.batch_size * len(config.modes)
    return -(-target // per_batch) + 1


def caption_pool(actors: int | EnginePlan, batches_in_flight: int) -> tuple[Any, dict[str, Any]]:
    """The pool of caption actors, each running `batches_in_flight` batches at once on threads: fixed for a
    count, Ray Data's autoscaling pool for a plan whose fewest and most differ.

    The actor's engine loop is shared by those threads, so one batch's requests wait in the engine
    while another drains. Ray 2.60 only runs a synchronous UDF on several threads with
    `enable_true_multi_threading`; earlier releases did so with the actor's `max_concurrency`.

    An autoscaling pool (`ActorPoolStrategy(min_size=, max_size=)`, ray/data/_internal/compute.py) grows when
    its utilisation, tasks in flight over the calls its actors run at once, passes Ray Data's upscaling
    threshold (`actor_pool_util_upscaling_threshold`, 1.75 in Ray 2.60: default_actor_autoscaler.py) and the
    cluster has room for one more actor. Utilisation can only pass 1 when an actor may hold more tasks than it
    runs, so each actor of an elastic pool is handed twice its batches (the second queue at the actor: Ray
    Data's own default factor); a fixed pool keeps one task per running batch.
    """
    import inspect

    from ray.data import ActorPoolStrategy

    if isinstance(actors, EnginePlan) and actors.elastic:
        kwargs: dict[str, Any] = {"min_size": actors.fewest, "max_size": actors.most,
                                  "max_tasks_in_flight_per_actor": 2 * batches_in_flight}
    else:
        size = actors.fewest if isinstance(actors, EnginePlan) else actors
        kwargs = {"size": size, "max_tasks_in_flight_per_actor": batches_in_flight}
    if "enable_true_multi_threading" in inspect.signature(ActorPoolStrategy).parameters:
        pool = ActorPoolStrategy(**kwargs, max_concurrent_calls_per_actor=batches_in_flight,
                                 enable_true_multi_threading=True)
        return pool, {}
    return ActorPoolStrategy(**kwargs), {"max_concurrency": batches_in_flight}


def execute(config: RunConfig, overwrite: bool = False, retry_errors: bool = False, allow_existing: bool = False,
            on_wait: Callable[[LeaseInfo, float], None] | None = None,
            captioner: type = CaptionActor,
            display: Callable[[Progress], AbstractContextManager[Any]] | None = None,
            hooks: RunHooks = NO_HOOKS, worker_setup: Callable[[], None] | None = None,
            redo: Selection | None = None) -> RunSummary:
    """Run the pipeline to completion under the output's lease and return the summary.

    `captioner` is the caption actor class (benchmarks swap in an instant stand-in to measure the rest);
    `display` draws the progress while the passes run (the console's live line); `hooks` reach into the
    caption actors' engines and the commits (tests only: run/hooks.py); `worker_setup` runs first in each
    Ray worker process when this run starts Ray (the CLI sets up the workers' logging with it: a library
    leaves logging to its caller)."""
    started = time.monotonic()
    ledger = Ledger(config.output.uri, config.output.storage_options)
    ledger.check_target(allow_existing)  # a foreign folder is refused before the lease is written
    lease = OutputLease(config.output.uri, config.output.storage_options, ttl_s=config.compute.lease_ttl_s)
    lease.acquire(wait=True, on_wait=on_wait)  # before anything is written; LeaseHeldError if live
    try:
        lease.start_heartbeat()
        metadata = RunMetadata.of(config)  # the config's fingerprint, computed once for the whole run
        work = prepare_output(ledger, config, metadata.manifest(config), overwrite, retry_errors,
                              fingerprint=metadata.fingerprint, redo=redo)  # redo: `run --redo` (run/redo.py)
        progress = Progress(total_shards=work.plan["shards"], done_shards=work.plan["shards"] - len(work.pending),
                            images_known=work.plan.get("images_known", 0), mode_names=[m.name for m in config.modes])
        committer = Committer(config, ledger, progress, lease, retrying=set(work.retry), hooks=hooks,
                              metadata=metadata)
        items, loop_cpu_s = work.items(), 0.0
        duplicates: dict[str, int] = {}
        engines: set[str] = set()  # the caption actors that returned batches, over every pass
        nodes = NodeWatch()  # says a node lost or joining on the console (run/nodes.py), across passes
        with contextlib.ExitStack() as stack:
            stack.callback(committer.close)  # commits in flight finish (or are cancelled) on every exit path
            if display and items:
                stack.enter_context(display(progress))
            if items and config.compute.dedup:  # the run's content index (engine/dedup.py), killed on every exit
                _init_ray(config, worker_setup)
                index = start_index(config.output.uri, config.compute.dedup_results)
                stack.callback(lambda: duplicates.update(stop_index(index) or {}))
            for attempt in range(1, MAX_PASSES + 1):
                if not items:
                    break
                if attempt > 1:
                    log.warning("pass %d: redoing %d shards that did not commit", attempt, len(items))
                loop_cpu_s += _run_pass(config, items, committer, captioner, hooks, worker_setup, engines, nodes)
                redo = set(committer.take_unfinished())
                items = [item for item in items if item.shard in redo]
        if items:
            raise RuntimeError(f"{len(items)} shards did not commit after {MAX_PASSES} passes (e.g. "
                               f"{items[0].shard}); see the log, then re-run to finish them")
        lease.check()
        summary = summarise(ledger, config, time.monotonic() - started, committer, loop_cpu_s,
                            fingerprint=metadata.fingerprint)
        summary = dataclasses.replace(summary, engines=len(engines) if engines else None,
                                      nodes_lost=[node.name() for node in nodes.lost])
        if duplicates:
            summary = dataclasses.replace(summary, duplicates={name: duplicates.get(name, 0) for name in
                                                               ("captioned", "reused", "recaptioned")})
        ledger.write_manifest({**(ledger.manifest() or {}), "last_summary": summary.to_dict(),
                               "updated_at": time.time()})
        check_health(summary, config.quality.max_error_share)
        return summary
    finally:
        try:
            lease.release()
        finally:
            ray_session.end()  # the caption actors and their engines, and a local Ray's every process


def _run_pass(config: RunConfig, items: list[WorkItem], committer: Committer, captioner: type,
              hooks: RunHooks, worker_setup: Callable[[], None] | None, engines: set[str] | None = None,
              nodes: NodeWatch | None = None) -> float:
    """One Ray Data execution over `items`: read, caption, write fragments, commit as shards complete.
    Returns the CPU seconds the driver's own loop spent (bookkeeping, and reading the write reports);
    adds the caption actors that captioned to `engines`; `nodes` watches the cluster's nodes meanwhile."""
    import ray

    _init_ray(config, worker_setup)
    plan = _actor_resources(config)
    gpus_per_actor = plan.gpus
    if config.engine.kind == "openai":  # requests to a server instead of an engine (pipeline/engine/remote.py)
        captioner = remote_captioner(captioner)
    log.info("caption engines: %s, each with %s", plan.describe(), plan.needs())
    config_json = config.model_dump_json()
    output = (config.output.uri, config.output.storage_options)
    # Work items cross into Ray Data as plain rows; read_and_prepare reads them back (WorkItem.from_row).
    ds = ray.data.from_items(work_rows(items), override_num_blocks=len(items))
    # A storage error that outlived the reader's own retries fails the read task; Ray runs it again.
    ds = ds.map_batches(read_and_prepare, batch_size=1, batch_format="pyarrow",
                        fn_kwargs={"config_json": config_json, "output_uri": output[0],
                                   "run_id": committer.run_id},  # keys recorded in this run's staging
                        num_cpus=config.compute.decode_cpus, max_retries=READ_TASK_RETRIES,
                        retry_exceptions=[TransientStorageError])
    pool, concurrency_args = caption_pool(plan, batches_in_flight(config, gpus_per_actor))
    ds = ds.map_batches(captioner, fn_constructor_kwargs=_captioner_kwargs(config_json, hooks),
                        batch_size=config.compute.batch_size, batch_format="pyarrow", compute=pool,
                        num_gpus=gpus_per_actor, num_cpus=config.compute.cpus_per_actor,
                        accelerator_type=config.compute.accelerator_type if gpus_per_actor else None,
                        max_restarts=config.compute.max_actor_restarts, max_task_retries=-1,
                        **concurrency_args)
    ds = ds.map_batches(write_stage, batch_size=None, batch_format="pyarrow",  # applies caption clean-up too
                        fn_kwargs={"output_uri": output[0], "storage_options": output[1], "run_id": committer.run_id,
                                   "config_json": config_json}, num_cpus=0.1)
    mark = time.thread_time()
    # Says what is missing while the engines or read tasks cannot be placed; fails the pass past the timeout.
    watch = PlacementWatch(plan, config.compute.decode_cpus, config.compute.placement_timeout_s,
                           progressed=lambda: committer.progress.captioned).start()
    # What the engines report of themselves (starting, ready, busy), for the console (run/engines.py).
    engine_watch = EngineWatch(committer.progress, expected=plan.fewest).start()
    node_watch = (nodes or NodeWatch()).start()  # a node lost or joining, in one line (run/nodes.py)
    try:
        for row in _rows_as_they_come(ds):
            report = WriteReport.from_row(row)
            if engines is not None:
                engines.update(row.get(ENGINE_COLUMN) or ())  # the caption actors seen (engine/options.py)
            committer.add(report.shard, report.shard_size, report.keys)
            committer.progress.maybe_log()
    finally:
        watch.stop()
        engine_watch.stop()
        node_watch.stop()
    committer.drain()
    return time.thread_time() - mark


def _rows_as_they_come(ds: Any) -> Iterator[dict[str, Any]]:
    """The write stage's reports, each block as soon as it is ready. `Dataset.iter_rows()` prefetches one block
    (`prefetch_batches=1` in Ray 2.60), so it hands a block over only once the next one is ready: every caption
    batch reached the driver, its commits and the console one batch late, and the last two together at the end
    (on the demo, the first captions showed a batch's minute late; measured with a stand-in taking 8 s a batch:
    each arrived 8 s after it was done, and at once without the prefetch)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        yield from batch.to_pylist()


def _captioner_kwargs(config_json: str, hooks: RunHooks) -> dict[str, Any]:
    """The caption actor's constructor arguments; the engine hook only when set, so a stand-in captioner
    (the benchmarks') needs no such argument."""
    return {"config_json": config_json, **({"engine_hook": hooks.engine} if hooks.engine is not None else {})}


def summarise(ledger: Ledger, config: RunConfig, seconds: float, committer: Committer,
              loop_cpu_s: float, *, fingerprint: str | None = None) -> RunSummary:
    """The output's totals over every committed shard, and this run's time and commit figures
    (`fingerprint`: the config's, when the caller has it already)."""
    totals = Totals.of(ledger.markers(fingerprint or config.fingerprint()), [mode.name for mode in config.modes])
    now = committer.committed
    return RunSummary(output=ledger.uri, shards=totals.shards, shards_committed_this_run=len(now),
                      images=totals.rows, ok=totals.ok, errors=totals.errors, error_reasons=totals.error_reasons,
                      modes=totals.modes_report(), seconds=round(seconds, 1),
                      fingerprint=fingerprint or config.fingerprint(),
                      commits=_commit_stats(now, seconds, committer, loop_cpu_s))


def _commit_stats(committed: list[Marker], seconds: float, committer: Committer, loop_cpu_s: float) -> CommitStats:
    """Rate and latency of this run's commits, and the driver's CPU per 1000 images they brought."""
    latencies = sorted(marker.commit_s for marker in committed if marker.commit_s is not None)
    images = sum(marker.rows for marker in committed)

    def per_1000_images(cpu_s: float) -> float | None:
        return round(1e6 * cpu_s / images, 2) if images else None

    return CommitStats(per_s=round(len(committed) / seconds, 3) if seconds > 0 else None,
                       latency_p50_s=_quantile(latencies, 0.5), latency_p99_s=_quantile(latencies, 0.99),
                       driver_loop_cpu_ms_per_1000_images=per_1000_images(loop_cpu_s),
                       commit_cpu_ms_per_1000_images=per_1000_images(committer.commit_cpu_s),
                       where=committer.where)


class UnhealthyOutputError(RuntimeError):
    """The run finished, but its output is mostly errors (or holds no caption at all)."""

    def __init__(self, message: str, summary: RunSummary) -> None:
        super().__init__(message)
        self.summary = summary


def check_health(summary: RunSummary, max_error_share: float) -> None:
    """Raise UnhealthyOutputError when nothing was captioned or errors pass `max_error_share`, saying what
    most errors were; an empty output (nothing planned) is not an error."""
    rows, ok, errors = summary.images, summary.ok, summary.errors
    if rows == 0 or (ok > 0 and errors / rows <= max_error_share):
        return
    reasons = ", ".join(f"{reason} ({count})" for reason, count in list(summary.error_reasons.items())[:3])
    verdict = "no image was captioned" if ok == 0 else (
        f"{errors / rows:.0%} of the rows are errors, above quality.max_error_share {max_error_share:.0%}")
    raise UnhealthyOutputError(f"{verdict}: {errors} of {rows} images failed; most errors were: {reasons}. "
                               "The rows are in the table with their reasons (`pipeline status` shows them)",
                               summary)


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of sorted `values` (nearest rank), or None when there are none."""
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None


def format_summary(summary: RunSummary) -> str:
    lines = [f"output      {summary.output}",
             f"images      {summary.images} ({summary.ok} captioned, {summary.errors} errors) in "
             f"{summary.shards} shards ({summary.shards_committed_this_run} committed this run)",
             f"time        {summary.seconds} s"]
    if summary.engines:
        lines.append(f"engines     {summary.engines} caption engine{'s' if summary.engines != 1 else ''} ran")
    if summary.nodes_lost:  # each was said when it happened; the summary keeps the count
        lost = len(summary.nodes_lost)
        lines.append(f"nodes       {lost} lost mid-run ({', '.join(summary.nodes_lost)}): "
                     f"{'its' if lost == 1 else 'their'} work in flight was redone")
    for name, stats in summary.modes.items():
        lines.append(f"mode {name:<12} {stats.captions} captions, {stats.tokens} tokens, "
                     f"glitch rate {stats.glitch_rate:.1%} ({stats.retries} retries)")
    if summary.error_reasons:
        lines.append("errors      " + ", ".join(f"{reason}: {count}"
                                               for reason, count in list(summary.error_reasons.items())[:5]))
    if summary.duplicates:
        lines.append(f"duplicates  {summary.duplicates.get('reused', 0)} rows reused another key's captions; "
                     f"{summary.duplicates.get('captioned', 0)} images sent to the engine")
    commits = summary.commits
    if commits.latency_p50_s is not None:
        where = f", on {commits.where}" if commits.where else ""
        lines.append(f"commits     {commits.per_s:.2f} shards/s, latency p50 {commits.latency_p50_s:.3f} s, "
                     f"p99 {commits.latency_p99_s:.3f} s{where}")
    return "\n".join(lines)



def validate_before_start(config: RunConfig) -> None:
    """Fail in seconds on what would otherwise fail after engine start: missing input or model folder."""
    from pipeline.config.uris import overlap
    from pipeline.io.sources import SourceError, check_input

    why = overlap(config.input.uri, config.output.uri)
    if why:
        raise SourceError(why)
    layout = check_input(config.input)  # the layout as a whole; a Parquet input's image column
    log.info("input %s: %s", config.input.uri, layout.describe().replace("\n", "; "))
    path = config.model.path
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.isabs(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise SourceError(f"model.path does not exist: {path}")
    problem = check_remote_model(config.model)  # a model.path URI: its folder holds a config.json
    if problem:
        raise SourceError(problem)
