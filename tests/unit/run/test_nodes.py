"""The driver's watch over the cluster's nodes: a node lost or joining mid-run, said in one line each."""

from __future__ import annotations

import logging
import threading

import pytest

from pipeline.engine.states import EXITED, READY, STARTING, EngineState
from pipeline.run.nodes import EnginesOn, NodeSeen, NodeWatch, diff, engines_by_node, node_of
from tests.unit.waiting import wait_until

HEAD = NodeSeen("aa" * 28, "10.0.0.1", True, {"CPU": 1.0})
SPOT = NodeSeen("bb" * 28, "10.0.0.2", True, {"CPU": 2.0, "spot": 1.0})
SPARE = NodeSeen("cc" * 28, "10.0.0.3", True, {"CPU": 2.0, "GPU": 1.0})


def dead(node: NodeSeen) -> NodeSeen:
    return NodeSeen(node.node_id, node.address, False, {})


def engine(actor: str, node: NodeSeen, batches: int = 0, state: str = READY) -> EngineState:
    return EngineState(actor, state, since=0.0, started=0.0, node_id=node.node_id, batches=batches)


class Cluster:
    """What `ray.nodes()` and the engines' reports say, changed by the test between polls."""

    def __init__(self, *nodes: NodeSeen) -> None:
        self.nodes, self.engines = list(nodes), []

    def watch(self, **kwargs: object) -> NodeWatch:
        return NodeWatch(nodes=lambda: list(self.nodes), engines=lambda: list(self.engines), **kwargs)


def test_a_ray_nodes_entry_is_read_with_its_id_address_and_resources():
    entry = {"NodeID": "ab12" * 14, "Alive": False, "NodeManagerAddress": "10.1.2.3", "Resources": {"CPU": 4.0}}
    node = node_of(entry)
    assert node == NodeSeen("ab12" * 14, "10.1.2.3", False, {"CPU": 4.0})
    assert node.name() == "node 10.1.2.3 (id ab12ab12)"
    assert node_of({"NodeID": "x", "Alive": True}).resources == {}


def test_diff_finds_nodes_dead_or_gone_and_nodes_new():
    known = {HEAD.node_id: HEAD, SPOT.node_id: SPOT}
    assert diff(known, [HEAD, SPOT]).lost == [] and diff(known, [HEAD, SPOT]).joined == []
    assert diff(known, [HEAD, dead(SPOT)]).lost == [SPOT]
    assert diff(known, [HEAD]).lost == [SPOT]  # gone from the list altogether
    change = diff(known, [HEAD, dead(SPOT), SPARE, dead(NodeSeen("dd" * 28, "10.0.0.4", True))])
    assert change.lost == [SPOT] and change.joined == [SPARE]  # a node never seen alive is not news


def test_engines_are_counted_per_node_with_the_batches_they_hold():
    states = [engine("a", SPOT, batches=2), engine("b", SPOT, batches=1, state=STARTING), engine("c", HEAD),
              engine("d", SPOT, batches=5, state=EXITED), EngineState("e", READY, 0.0, 0.0)]
    assert engines_by_node(states) == {SPOT.node_id: EnginesOn(2, 3), HEAD.node_id: EnginesOn(1, 0)}


def test_the_first_look_is_the_baseline_and_says_nothing(caplog: pytest.LogCaptureFixture):
    cluster = Cluster(HEAD, SPOT)
    watch = cluster.watch()
    with caplog.at_level(logging.INFO, "pipeline.run.nodes"):
        assert watch.poll() == [] and watch.poll() == []
    assert caplog.text == "" and set(watch.known or {}) == {HEAD.node_id, SPOT.node_id}


def test_a_lost_node_is_said_once_with_its_engines_and_batches_then_its_replacement_joins(
        caplog: pytest.LogCaptureFixture):
    cluster = Cluster(HEAD, SPOT)
    cluster.engines = [engine("actor1", SPOT, batches=1)]
    watch = cluster.watch()
    with caplog.at_level(logging.INFO, "pipeline.run.nodes"):
        watch.poll()
        cluster.nodes = [HEAD, dead(SPOT)]
        cluster.engines = [engine("actor1", SPARE, state=STARTING)]  # already moved: counted where it was
        [line] = watch.poll()
        assert line == ("node 10.0.0.2 (id bbbbbbbb) lost: 1 caption engine on it is being replaced, its 1 batch in "
                        "flight is redone; nothing committed is lost")
        assert watch.poll() == []  # said once, not at every look while it stays dead
        cluster.nodes.append(SPARE)
        assert watch.poll() == ["node 10.0.0.3 (id cccccccc) joined (2 CPUs, 1 GPU)"]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [line]  # the console shows warnings; the log file gets them too
    assert "joined (2 CPUs, 1 GPU)" in caplog.text
    assert watch.lost == [SPOT] and watch.joined == [SPARE]


def test_the_line_says_how_many_engines_and_batches_and_when_none_was_there():
    cluster = Cluster(HEAD, SPOT, SPARE)
    cluster.engines = [engine("a", SPOT, batches=2), engine("b", SPOT, batches=1), engine("c", HEAD)]
    watch = cluster.watch()
    watch.poll()
    cluster.nodes = [HEAD]
    lines = watch.poll()
    assert lines[0].endswith("lost: 2 caption engines on it are being replaced, its 3 batches in flight are "
                             "redone; nothing committed is lost")
    assert lines[1].endswith("lost: no caption engine was on it; its read and write tasks in flight are redone; "
                             "nothing committed is lost")


def test_without_engine_reports_the_line_does_not_guess_a_count():
    cluster = Cluster(HEAD, SPOT)  # a stand-in captioner reports nothing
    watch = cluster.watch()
    watch.poll()
    cluster.nodes = [HEAD]
    [line] = watch.poll()
    assert "lost: any caption engine on it is being replaced and its work in flight is redone" in line


def test_a_failing_listing_is_logged_once_and_never_ends_the_watch(caplog: pytest.LogCaptureFixture):
    cluster, failing = Cluster(HEAD, SPOT), [False]

    def nodes() -> list[NodeSeen]:
        if failing[0]:
            raise ConnectionError("GCS unavailable")
        return list(cluster.nodes)

    watch = NodeWatch(nodes=nodes, engines=lambda: [])
    with caplog.at_level(logging.INFO, "pipeline.run.nodes"):
        watch.poll()
        failing[0] = True
        assert watch.poll() == [] and watch.poll() == []
        assert caplog.text.count("could not list the cluster's nodes (ConnectionError: GCS unavailable)") == 1
        failing[0] = False
        cluster.nodes = [HEAD]
        assert len(watch.poll()) == 1 and watch.lost == [SPOT]


def test_the_watch_polls_on_its_thread_and_remembers_across_passes():
    cluster, polled = Cluster(HEAD, SPOT), threading.Event()

    def nodes() -> list[NodeSeen]:
        polled.set()
        return list(cluster.nodes)

    watch = NodeWatch(nodes=nodes, engines=lambda: [], poll_s=0.01)
    with watch:
        wait_until(lambda: watch.known is not None, what="the baseline")
    cluster.nodes = [HEAD]  # lost between two passes: said at the next pass's first look
    with watch:
        wait_until(lambda: watch.lost, what="the lost node")
    assert watch.lost == [SPOT] and polled.is_set()
