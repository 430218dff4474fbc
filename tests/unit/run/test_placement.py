"""How many engines a pass asks for, the pool Ray Data gets, and what the placement watch says and does."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipeline.config import build_config
from pipeline.run.driver import caption_pool
from pipeline.run.placement import (
    EnginePlan,
    NodeResources,
    PlacementError,
    PlacementWatch,
    diagnose,
    plan_engines,
    raise_in_thread,
)


def config(**compute: object):
    return build_config({"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"},
                         "modes": [{"name": "tags", "type": "booru_like"}], "compute": compute})


def node(cpus: float, gpus: float = 0, kind: str | None = None, address: str = "10.0.0.1") -> NodeResources:
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **({f"accelerator_type:{kind}": 1} if kind else {})}
    return NodeResources(address, resources)


def test_engines_from_a_count_a_range_auto_and_unset():
    gpu_nodes = [node(16, 8), node(16, 8, address="10.0.0.2")]
    assert plan_engines(config(), gpu_nodes) == EnginePlan(16, 16, 1.0, 1.0)  # one per GPU, as before
    assert plan_engines(config(), [node(2)]) == EnginePlan(1, 1, 0.0, 1.0)
    assert plan_engines(config(actors=3), gpu_nodes).fewest == 3
    assert plan_engines(config(actors="1..4"), gpu_nodes) == EnginePlan(1, 4, 1.0, 1.0)
    assert plan_engines(config(actors="auto"), gpu_nodes) == EnginePlan(1, None, 1.0, 1.0)  # grows with the GPUs
    cpu_nodes = [node(4), node(4, address="b"), node(0.5, address="c")]
    assert plan_engines(config(actors="auto"), cpu_nodes) == EnginePlan(1, 2, 0.0, 1.0)  # one per node that fits
    assert plan_engines(config(actors="auto", gpus_per_actor=2), gpu_nodes).gpus == 2.0
    plan = plan_engines(config(actors="1..2", accelerator_type="H100"), gpu_nodes)
    assert plan.accelerator_type == "H100" and plan.describe() == "1 to 2 engines"
    assert EnginePlan(1, None, 1, 1).describe() == "1 engine and more as GPUs appear"


def test_an_elastic_pool_can_grow_past_ray_datas_upscaling_threshold_and_a_fixed_one_cannot_grow():
    pool, extra = caption_pool(EnginePlan(1, 4, 1.0, 1.0), batches_in_flight=3)
    assert (pool.min_size, pool.max_size, pool.initial_size) == (1, 4, 1) and extra == {}
    # Utilisation = tasks in flight / calls running at once; 6 / 3 = 2 passes Ray Data's threshold of 1.75.
    assert pool.max_tasks_in_flight_per_actor == 6 and pool.max_concurrent_calls_per_actor == 3
    unbounded, _ = caption_pool(EnginePlan(1, None, 1.0, 1.0), batches_in_flight=1)
    assert unbounded.max_size == float("inf")
    fixed, _ = caption_pool(EnginePlan(2, 2, 1.0, 1.0), batches_in_flight=2)
    assert (fixed.min_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (2, 2, 2)
    assert caption_pool(3, 1)[0].min_size == 3


def test_what_is_missing_is_named():
    cpu_engine = EnginePlan(1, 1, 0.0, 1.0)
    assert diagnose(cpu_engine, [node(2)], read_cpus=0.25) is None
    # One CPU: the engine fits, a read task beside it does not.
    problem = diagnose(cpu_engine, [node(1)], read_cpus=0.25)
    assert problem.startswith("missing CPU beside the engines") and "0.25 CPU left for a read task" in problem
    # The read task may use another node.
    assert diagnose(cpu_engine, [node(1), node(0.5, address="b")], read_cpus=0.25) is None
    assert diagnose(EnginePlan(1, 1, 0.0, 4.0), [node(2)], 0.25).startswith("missing CPU: 1 engine needs 4 CPU (")
    gpu_engines = EnginePlan(2, 2, 1.0, 1.0)
    problem = diagnose(gpu_engines, [node(8, 1)], read_cpus=1)
    assert problem.startswith("missing GPU: 2 engines need 1 GPU each") and "waiting for a GPU node" in problem
    assert diagnose(gpu_engines, [node(8, 1), node(8, 1, address="b")], 1) is None
    h100 = EnginePlan(1, 1, 1.0, 1.0, "H100")
    problem = diagnose(h100, [node(8, 4, "A10G")], 1)
    assert problem.startswith("missing GPU of type H100") and "the cluster's GPUs are A10G" in problem
    assert diagnose(h100, [node(8, 4, "A10G"), node(8, 1, "H100", "b")], 1) is None
    assert diagnose(cpu_engine, [], 0.25).startswith("missing CPU: 1 engine needs 1 CPU (")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_watch_says_what_is_missing_at_once_and_fails_past_the_timeout(caplog: pytest.LogCaptureFixture):
    clock, nodes, captioned = Clock(), [node(1)], [0]
    watch = PlacementWatch(EnginePlan(1, 1, 0.0, 1.0), 0.25, timeout_s=30, progressed=lambda: captioned[0],
                           nodes=lambda: nodes, clock=clock, say_every_s=10)
    with caplog.at_level(logging.WARNING, "pipeline.run.placement"):
        assert watch.check() is None
        assert "waiting for resources: missing CPU beside the engines" in caplog.text
        assert "fails if this lasts 30 s: compute.placement_timeout_s" in caplog.text
        clock.now = 12
        assert watch.check() is None and "still waiting for resources after 12 s" in caplog.text
        clock.now = 30
        failure = watch.check()
    assert failure.startswith("cannot place the run: missing CPU beside the engines") and "waited 30 s" in failure


def test_a_node_that_joins_in_time_clears_the_wait_and_captions_mean_it_is_placed(caplog: pytest.LogCaptureFixture):
    clock, nodes, captioned = Clock(), [node(1)], [0]
    watch = PlacementWatch(EnginePlan(2, 2, 0.0, 1.0), 0.25, timeout_s=30, progressed=lambda: captioned[0],
                           nodes=lambda: nodes, clock=clock)
    with caplog.at_level(logging.WARNING, "pipeline.run.placement"):
        watch.check()
        clock.now = 20
        nodes.append(node(2, address="b"))
        assert watch.check() is None and "resources found" in caplog.text
        clock.now = 100
        assert watch.check() is None
        # The second node leaves; one engine still runs and captions: said once, never failed.
        nodes.pop()
        watch.check()
        for step in range(1, 20):
            clock.now = 100 + 10 * step
            captioned[0] += 1
            assert watch.check() is None
    assert caplog.text.count("not every engine can be placed") == 1


def test_the_failure_is_raised_in_the_passs_thread_and_ends_what_it_waits_on():
    caught: list[BaseException] = []
    started = threading.Event()

    def waiting_like_ray_datas_iterator() -> None:
        started.set()
        try:
            while True:
                time.sleep(0.01)
        except PlacementError as err:
            caught.append(err)

    thread = threading.Thread(target=waiting_like_ray_datas_iterator, daemon=True)
    thread.start()
    started.wait()
    assert raise_in_thread(thread.ident, "cannot place the run: missing CPU")
    thread.join(timeout=10)
    assert not thread.is_alive() and str(caught[0]) == "cannot place the run: missing CPU"


def test_a_watch_that_fails_interrupts_the_pass_and_a_stopped_one_never_does():
    nodes, caught = [node(1)], []
    done = threading.Event()

    def pass_thread() -> None:
        watch = PlacementWatch(EnginePlan(1, 1, 0.0, 1.0), 0.25, timeout_s=0.3, progressed=lambda: 0,
                               nodes=lambda: nodes, poll_s=0.05).start()
        try:
            while not done.is_set():
                time.sleep(0.01)
        except PlacementError as err:
            caught.append(err)
        finally:
            watch.stop()

    thread = threading.Thread(target=pass_thread, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert caught and "missing CPU beside the engines" in str(caught[0])
    watch = PlacementWatch(EnginePlan(1, 1, 0.0, 1.0), 0.25, timeout_s=0.2, progressed=lambda: 0,
                           nodes=lambda: nodes, poll_s=0.05).start()
    watch.stop()
    time.sleep(0.5)  # nothing is raised here after stop()
