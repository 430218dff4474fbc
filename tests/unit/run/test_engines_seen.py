"""Which caption actors made a batch reaches the driver (not the table), and what the actor counts for metrics."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq

from pipeline.engine import metrics
from pipeline.engine.actor import CaptionActor, Generation, Refused
from pipeline.engine.metrics import EngineGauges, Metrics
from pipeline.engine.options import ENGINE_COLUMN, engine_config_values, engine_id, stamp_engine
from pipeline.run.stages import write_stage
from pipeline.table.schema import in_flight_schema, to_table


def batch(shard: str, engine: str | None) -> object:
    table = to_table({"key": ["a.jpg", "b.jpg"], "shard": [shard] * 2, "status": ["ok", "error"],
                      "error": [None, "not an image"], "tags": ["cat", None], "shard_size": [None, 2]},
                     in_flight_schema(["tags"]))
    return stamp_engine(table, engine) if engine else table


def test_the_write_stage_reports_the_engine_and_writes_no_engine_column(tmp_path: Path):
    reports = write_stage(batch("000000", "actor-1"), str(tmp_path), {})
    assert reports.column(ENGINE_COLUMN).to_pylist() == [["actor-1"]]
    assert reports.select(["shard", "shard_size", "keys"]).to_pylist() == [
        {"shard": "000000", "shard_size": 2, "keys": ["a.jpg", "b.jpg"]}]
    fragments = list(Path(tmp_path).rglob("*.parquet"))
    assert fragments and all(ENGINE_COLUMN not in pq.read_schema(f).names for f in fragments)
    # A stand-in captioner (the benchmarks') stamps nothing: the report has no engine column then.
    assert ENGINE_COLUMN not in write_stage(batch("000001", None), str(tmp_path), {}).column_names


def test_outside_an_actor_the_engine_is_named_after_its_process_and_metrics_do_nothing(monkeypatch):
    assert engine_id().startswith("pid-")  # a driver (or no Ray at all) is no actor
    monkeypatch.setattr(metrics, "_ray_running", lambda: False)  # another test may have started Ray here
    made = Metrics()
    made.inc("captions", 3, mode="tags", engine="e")
    made.set("requests_in_flight", 2, engine="e")
    made.observe("commit_latency_seconds", 0.5)
    assert made._made == {}  # no Ray here: nothing was created, nothing raised


def test_the_actor_counts_rows_captions_and_retries_per_mode(monkeypatch):
    seen = []
    monkeypatch.setattr("pipeline.engine.actor.batch_done", lambda *args: seen.append(args))
    stub = SimpleNamespace(modes=[SimpleNamespace(name="tags"), SimpleNamespace(name="description")],
                           engine_id="e1", _engine=lambda: "e1")
    g = Generation("text", 3, "stop", None, 1, 0, "p")
    retried = Generation("text", 3, "stop", None, 3, 0, "p")
    columns = {"status": ["ok", "error", "ok", "error"]}
    generations = [[g, retried], [Refused("too long"), g], [g, Generation("", 0, "stop", "empty", 2, 0, "p")]]
    CaptionActor._count(stub, columns, [0, 1, 2], generations)  # row 1 was refused: an error row now
    assert seen == [("e1", 2, 2, {"tags": (2, 0), "description": (1, 3)})]


def test_engine_gauges_sample_in_flight_waiting_and_idle(monkeypatch):
    calls = []
    monkeypatch.setattr(metrics.METRICS, "set", lambda name, value, **tags: calls.append((name, value, tags)))
    gauges = EngineGauges("e1", lambda: (5, 12, 0.25))
    gauges.refresh()
    assert calls == [("requests_in_flight", 5, {"engine": "e1"}), ("requests_waiting", 12, {"engine": "e1"}),
                     ("engine_idle_share", 0.25, {"engine": "e1"})]
    calls.clear()
    gauges.stop()
    assert ("engine_up", 0, {"engine": "e1"}) in calls and ("requests_in_flight", 0, {"engine": "e1"}) in calls


def test_engine_config_values_are_found_on_the_engines_sub_configs():
    engine = SimpleNamespace(vllm_config=SimpleNamespace(
        scheduler_config=SimpleNamespace(max_num_batched_tokens=4096), cache_config=SimpleNamespace(block_size=16),
        model_config=None))
    assert engine_config_values(engine, ["max_num_batched_tokens", "block_size", "nowhere"]) == {
        "max_num_batched_tokens": "4096 (scheduler_config)", "block_size": "16 (cache_config)"}
    assert engine_config_values(object(), ["x"]) == {}


def test_the_summary_and_status_say_how_many_engines_ran():
    from pipeline.run.driver import format_summary
    from pipeline.run.records import RunSummary
    from pipeline.table.records import StatusReport
    from pipeline.table.status import format_status

    assert "engines     2 caption engines ran" in format_summary(RunSummary(output="/o", engines=2))
    assert "engines" not in format_summary(RunSummary(output="/o"))
    assert RunSummary.from_dict(RunSummary(output="/o", engines=3).to_dict()).engines == 3
    report = StatusReport(output="/o", engines_last_run=2)
    assert "engines     2 caption engines ran in the last finished run" in format_status(report)
