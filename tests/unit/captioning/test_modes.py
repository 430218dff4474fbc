"""Modes: defaults filled in, weighted prompt sets drawn reproducibly, derived seeds."""

from __future__ import annotations

from collections import Counter

from pipeline.captioning.modes import derive_seed
from pipeline.config import build_config
from tests.unit.config.test_settings import base


def test_run_defaults_fill_what_a_mode_leaves_out():
    config = build_config(base(defaults={"temperature": 0.4, "top_p": 0.8, "top_k": 20, "max_tokens": 99}),
                          ["modes.1.temperature=0.9"])
    tags, description = config.resolved_modes()
    assert (tags.temperature, tags.top_p, tags.top_k, tags.max_tokens) == (0.4, 0.8, 20, 128)
    assert (description.temperature, description.max_tokens) == (0.9, 256)


def test_custom_prompt_prepend_append_and_name():
    config = build_config(base(modes=[
        {"name": "custom", "prompt": "Describe the {{colour}} object.", "prepend": "ohwx, ", "append": " END"},
        {"name": "named", "type": "descriptive", "extra": ["name"], "character_name": "Ava"},
    ]))
    custom, named = config.resolved_modes()
    assert custom.instructions == ("Describe the {{colour}} object.",)  # a template: braces doubled (fields.py)
    assert custom.instruction_for_row(0, "k.jpg", None) == ("Describe the {colour} object.", [])
    assert (custom.prepend, custom.append) == ("ohwx, ", " END")
    assert named.instructions[0].endswith("you must refer to them as Ava.")


def test_weighted_prompts_are_drawn_by_weight_and_reproducibly():
    config = build_config(base(modes=[{"name": "mixed", "prompts": [
        {"type": "booru_like", "length": 50, "weight": 3},
        {"prompt": "Write a haiku about this image.", "weight": 1},
    ]}]))
    (mixed,) = config.resolved_modes()
    keys = [f"img{i}.jpg" for i in range(4000)]
    draws = [mixed.instruction_for(0, key) for key in keys]
    assert draws == [mixed.instruction_for(0, key) for key in keys]
    share = Counter(draws)[mixed.instructions[0]] / len(keys)
    assert 0.72 < share < 0.78
    assert draws != [mixed.instruction_for(1, key) for key in keys]


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "a.jpg", "tags") == derive_seed(0, "a.jpg", "tags")
    seeds = {derive_seed(0, "a.jpg", "tags"), derive_seed(0, "b.jpg", "tags"), derive_seed(0, "a.jpg", "desc"),
             derive_seed(1, "a.jpg", "tags"), derive_seed(0, "a.jpg", "tags", attempt=1)}
    assert len(seeds) == 5
    assert all(0 <= seed < 2**63 for seed in seeds)
