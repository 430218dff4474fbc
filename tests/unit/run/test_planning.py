"""pipeline.run.planning: plans that resume, grow with their input, and report what is gone (no Ray, no engine)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.config import build_config
from pipeline.run.planning import UnitSet, prepare_output, unit_hash
from pipeline.table.ledger import Ledger
from pipeline.table.names import plan_done_path, plan_path
from pipeline.table.records import Marker


def _config(folder: Path, out: Path, size: int = 2):
    return build_config({"input": {"uri": str(folder), "shard_size": size}, "output": {"uri": str(out)},
                         "model": {"path": "m"}, "modes": [{"name": "tags", "type": "booru_like"}]})


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\xff\xd8 not decoded here")


def _finish(ledger: Ledger, shards: list[str]) -> None:
    for shard in shards:
        ledger.write_marker(Marker.of(shard, {"rows": 2, "ok": 2, "errors": 0}))


def _members(ledger: Ledger) -> dict[str, list[str]]:
    return {shard.id: shard.members for shard in ledger.planned_shards()}


def test_a_finished_output_grows_with_its_input(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder, out = tmp_path / "in", tmp_path / "out"
    _images(folder, ["a.jpg", "b.jpg", "c/d.jpg"])
    config, ledger = _config(folder, out), Ledger(str(out))
    work = prepare_output(ledger, config, {"fingerprint": config.fingerprint()})
    assert work.pending == ["000000", "000001"] and work.plan["images_known"] == 3
    before = _members(ledger)

    # Unfinished: the plan is trusted and the input is not listed again.
    _images(folder, ["aa.jpg"])
    assert prepare_output(ledger, config, {}).pending == ["000000", "000001"]
    assert _members(ledger) == before

    # Finished: new files go into new shards after the last one; planned shards are untouched.
    _finish(ledger, ["000000", "000001"])
    _images(folder, ["e.jpg", "z/y.jpg"])
    with caplog.at_level(logging.INFO, logger="pipeline.run.planning"):
        work = prepare_output(ledger, config, {})
    assert work.pending == ["000002", "000003"]
    assert _members(ledger) == {**before, "000002": ["aa.jpg", "e.jpg"], "000003": ["z/y.jpg"]}
    assert work.plan["shards"] == 4 and work.plan["images_known"] == 6 and len(work.plan["grown"]) == 1
    assert "3 new images in 2 new shards" in caplog.text

    # Files gone are reported, never dropped; nothing new means no new shard.
    _finish(ledger, ["000002", "000003"])
    (folder / "b.jpg").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.run.planning"):
        work = prepare_output(ledger, config, {})
    assert work.pending == [] and work.plan["shards"] == 4
    assert "1 files planned before are gone from the input (e.g. b.jpg)" in caplog.text


def test_a_plan_cut_short_is_planned_again(tmp_path: Path):
    folder, out = tmp_path / "in", tmp_path / "out"
    _images(folder, [f"{i}.jpg" for i in range(5)])
    config, ledger = _config(folder, out), Ledger(str(out))
    prepare_output(ledger, config, {"fingerprint": config.fingerprint()})
    Path(plan_done_path(str(out))).unlink()  # killed while planning
    Path(plan_path(str(out), "000002")).unlink()
    work = prepare_output(ledger, config, {})
    assert work.pending == ["000000", "000001", "000002"] and work.plan["images_known"] == 5


def test_unit_set_membership_and_difference():
    from array import array

    old = UnitSet(array("Q", [unit_hash(u) for u in ("a", "b", "c", "a")]))
    new = UnitSet(array("Q", [unit_hash(u) for u in ("b", "c", "d")]))
    assert len(old) == 3 and unit_hash("a") in old and unit_hash("d") not in old
    assert old.missing_from(new) == 1 and new.missing_from(old) == 1
    assert unit_hash("x") not in UnitSet(array("Q"))


def test_a_marker_of_another_fingerprint_is_not_done(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A run that lost the output to this config's run wrote a marker late: its shard is redone. Markers written
    before markers named their holder stay valid when their fingerprint matches."""
    from pipeline.table.names import part_name, part_path

    folder, out = tmp_path / "in", tmp_path / "out"
    _images(folder, [f"{i}.jpg" for i in range(6)])
    config, ledger = _config(folder, out), Ledger(str(out))
    prepare_output(ledger, config, {"fingerprint": config.fingerprint()})
    (out / "data").mkdir()
    for shard in ("000000", "000001", "000002", "000009"):
        Path(part_path(str(out), shard)).write_bytes(b"rows")
    Path(part_path(str(out), "000002", part_name("000002", "e" * 32))).write_bytes(b"rows of a redone pair")
    ledger.write_marker(Marker.of("000000", {"rows": 2, "fingerprint": config.fingerprint()}))  # an old marker
    ledger.write_marker(Marker.of("000001", {"rows": 2, "fingerprint": "another", "holder": "f" * 32}))
    ledger.write_marker(Marker.of("000002", {"rows": 2, "fingerprint": config.fingerprint(), "holder": "e" * 32,
                                             "part": part_name("000002", "e" * 32)}))
    ledger.write_marker(Marker.of("000009", {"rows": 2, "fingerprint": "another"}))  # a shard this plan lacks
    with caplog.at_level(logging.INFO):
        work = prepare_output(ledger, config, {})
    assert work.pending == ["000001"]
    assert "2 shards have markers written under another config (fingerprint another" in caplog.text
    assert [r.levelname for r in caplog.records if "under another config" in r.getMessage()] == ["WARNING"]
    assert "shard 000001: its marker was written under config fingerprint another" in caplog.text  # the log's detail
    assert ledger.committed_ids() == {"000000", "000001", "000002"}  # 000009's pair is gone; 000001's stays ...
    assert sorted(p.name for p in (out / "data").iterdir()) == [  # ... till its commit replaces it; 000002's old
        part_name("000000"), part_name("000001"), part_name("000002", "e" * 32)]  # part (named by none) is gone
    assert [m.shard for m in ledger.markers(config.fingerprint())] == ["000000", "000002"]  # ... and is not done
