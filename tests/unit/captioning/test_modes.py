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


# ------------------------------------------------------------------------------------------- chained modes
CHAIN = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 128},
         {"name": "description", "prompt": "Describe this image. Its tags: {tags}.", "requires": ["tags"]},
         {"name": "short", "prompt": "Rewrite in at most 40 words: {mode.description}", "requires": ["description"],
          "image": False, "max_tokens": 77}]


def _error(tree: dict) -> str:
    import pytest

    from pipeline.config.settings import ConfigError

    with pytest.raises(ConfigError) as raised:
        build_config(tree)
    return str(raised.value)


def test_a_chain_resolves_to_stages_in_dependency_order_whatever_the_listing_order():
    from pipeline.captioning.modes import stage_groups

    modes = build_config(base(modes=list(reversed(CHAIN)))).resolved_modes()
    assert [(mode.name, mode.stage) for mode in modes] == [("short", 2), ("description", 1), ("tags", 0)]
    assert stage_groups(modes) == [[2], [1], [0]]
    # A bare required name is stored as `{mode.NAME}`, so both spellings are one config.
    assert modes[1].instructions == ("Describe this image. Its tags: {mode.tags}.",)
    assert not modes[0].image and modes[1].image


def test_a_required_mode_s_name_shadows_the_built_in_field_only_where_it_is_required():
    plain = build_config(base(modes=[{"name": "d", "prompt": "Tags: {tags}."}])).resolved_modes()[0]
    assert plain.instructions == ("Tags: {tags}.",)  # the row's own tags (captioning/fields.py)
    chained = build_config(base(modes=CHAIN[:2])).resolved_modes()[1]
    text, missing = chained.instruction_for_row(0, "a/b.jpg", {"tags": ["meta", "tags"]}, {"tags": "cat, sofa"})
    assert (text, missing) == ("Describe this image. Its tags: cat, sofa.", [])
    text, missing = chained.instruction_for_row(0, "a/b.jpg", None, {})
    assert missing == ["mode.tags"]


def test_chained_text_is_the_cleaned_caption_without_prepend_and_append():
    tree = base(modes=[{**CHAIN[0], "prepend": "tags: ", "cleanup": {"tags": {"dedupe": True, "style": "spaces"}}},
                       CHAIN[1]])
    tags = build_config(tree).resolved_modes()[0]
    assert tags.chained_text("long_hair, Long hair, cat") == "long hair, cat"


def test_unknown_required_modes_cycles_and_unrequired_fields_fail_at_load_naming_the_key():
    assert "invalid config: modes.0.requires: ['nope'] is not a mode of this run" in _error(
        base(modes=[{"name": "a", "prompt": "x {mode.nope}", "requires": ["nope"]}]))
    cycle = _error(base(modes=[{"name": "a", "prompt": "{b}", "requires": ["b"]},
                               {"name": "b", "prompt": "{c}", "requires": ["c"]},
                               {"name": "c", "prompt": "{a}", "requires": ["a"]}]))
    assert "cycle: a -> b -> c -> a" in cycle and "modes.0.requires" in cycle
    assert "add `requires: ['tags']`" in _error(base(modes=[CHAIN[0], {"name": "d", "prompt": "{mode.tags}"}]))
    assert "cannot require itself" in _error(base(modes=[{"name": "a", "prompt": "x", "requires": ["a"]}]))
    assert "key image: a text-only mode" in _error(base(modes=[{"name": "a", "type": "straightforward",
                                                                "image": False}]))


def test_the_fingerprint_covers_the_chain_and_is_unchanged_for_configs_without_one():
    from pipeline.captioning.modes import resolve_modes
    from pipeline.captioning.specs import Defaults, ModeConfig

    chain = build_config(base(modes=CHAIN))
    rewired = build_config(base(modes=[*CHAIN[:2], {**CHAIN[2], "image": True}]))
    assert chain.fingerprint() != rewired.fingerprint()
    spelled = build_config(base(modes=[CHAIN[0], {**CHAIN[1], "prompt": "Describe this image. Its tags: "
                                                                         "{mode.tags}."}, CHAIN[2]]))
    assert spelled.fingerprint() == chain.fingerprint()
    plain = resolve_modes([ModeConfig(name="t", type="booru_like")], Defaults())[0].describe()
    assert "requires" not in plain and "image" not in plain
