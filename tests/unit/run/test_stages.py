"""run.stages.dedup_key: two copies of one image share their work only when every mode asks them the same."""

from __future__ import annotations

from pipeline.config import build_config
from pipeline.run.stages import dedup_key


def _modes(modes: list[dict]) -> tuple:
    config = build_config({"input": {"uri": "/in"}, "output": {"uri": "/out"}, "model": {"path": "m"},
                           "modes": modes})
    return tuple(config.resolved_modes())


def test_fixed_instructions_leave_the_image_alone_to_decide():
    modes = _modes([{"name": "tags", "type": "booru_like"}, {"name": "short", "prompt": "Describe it briefly."}])
    assert dedup_key("abc", modes, 0, "a/1.jpg", None) == dedup_key("abc", modes, 0, "b/2.jpg", None) == "abc"


def test_a_template_field_that_differs_keeps_copies_apart():
    modes = _modes([{"name": "alt", "prompt": "Write a caption. The alt text is: {meta.caption}"}])
    one = dedup_key("abc", modes, 0, "a/1.jpg", '{"caption": "a red car"}')
    two = dedup_key("abc", modes, 0, "b/2.jpg", '{"caption": "a blue car"}')
    same = dedup_key("abc", modes, 0, "c/3.jpg", '{"caption": "a red car"}')
    assert one != two and one == same


def test_a_weighted_prompt_set_draws_per_key():
    modes = _modes([{"name": "mixed", "prompts": [{"prompt": "Describe it.", "weight": 1},
                                                  {"prompt": "List what you see.", "weight": 1}]}])
    keys = [f"k{i}" for i in range(40)]
    assert len({dedup_key("abc", modes, 0, key, None) for key in keys}) == 2  # one per instruction drawn
