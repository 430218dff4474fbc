"""pipeline.run.hooks: a run without hooks does nothing at its moments; a set pause is called with each."""

from __future__ import annotations

from pipeline.run.hooks import AFTER_PART_FILE, NO_HOOKS, RunHooks


def test_unset_hooks_do_nothing():
    assert RunHooks() == NO_HOOKS and NO_HOOKS.engine is None
    RunHooks().at("x")  # no pause set: returns, nothing else


def test_a_set_pause_is_called_with_each_moment():
    moments: list[str] = []
    RunHooks(pause=moments.append).at(AFTER_PART_FILE)
    assert moments == [AFTER_PART_FILE]
