"""Template fields in instructions: filled from a row's meta, escaped braces, the missing-value rules, and
the check at config load."""

from __future__ import annotations

import json

import pytest

from pipeline.captioning import modes as modes_module
from pipeline.captioning.fields import fill, literal, parse
from pipeline.captioning.modes import resolve_modes, row_instructions
from pipeline.captioning.specs import Defaults, ModeConfig

META = json.dumps({"caption": "a red barn at dusk", "url": "http://x/1.jpg", "txt": "sidecar text",
                   "json": {"tags": ["barn", "sunset"], "nested": {"deep": 3}},
                   "columns": {"aesthetic": 6.5, "a.b": "dotted"}, "a.b": "whole key"})


def test_fields_are_filled_from_the_meta_and_key() -> None:
    text, missing = fill("Alt text: {meta.caption}. From {meta.url} in {folder}; tags {tags}; score "
                         "{column.aesthetic}; deep {meta.json.nested.deep}; {meta.a.b}; {sidecar}",
                         "farm/barns/1.jpg", META)
    assert text == ("Alt text: a red barn at dusk. From http://x/1.jpg in barns; tags barn, sunset; score 6.5; "
                    "deep 3; whole key; sidecar text")
    assert missing == []
    assert fill("{meta.columns.a.b}", "k", META)[0] == "dotted"  # dotted column names resolve by path
    assert fill("{sidecar}", "k", {"json": {"x": 1}})[0] == '{"x":1}'  # no .txt: the .json, compact
    assert fill("{folder|top}", "top.jpg", None)[0] == "top"


def test_braces_escape_and_text_without_fields_is_itself() -> None:
    assert fill("Use {{json}} and }} here {meta.caption}", "k", META)[0] == "Use {json} and } here a red barn at dusk"
    assert fill("No fields {{x}}.", "k", None) == ("No fields {x}.", [])
    assert literal("a {b} }") == "a {{b}} }}" and fill(literal("a {b} }"), "k", None)[0] == "a {b} }"


def test_missing_values_follow_their_rule() -> None:
    template = "Describe the image. Its alt text is {meta.caption?}. Its source: {meta.url|unknown}.\nBe brief!"
    assert fill(template, "k", META)[0] == ("Describe the image. Its alt text is a red barn at dusk. "
                                            "Its source: http://x/1.jpg.\nBe brief!")
    assert fill(template, "k", None) == ("Describe the image. Its source: unknown.\nBe brief!", [])
    assert fill(template, "k", {"caption": "  "})[0].startswith("Describe the image. Its source")  # blank = missing
    assert fill("Caption: {meta.caption}. Go.", "k", "{not json") == ("Caption: . Go.", ["meta.caption"])
    assert fill("First {tags?}! Second.", "k", {})[0] == "Second."
    assert fill("One. Two {meta.x?}", "k", {})[0] == "One."


@pytest.mark.parametrize("bad", ["{foo}", "{meta.}", "{ meta.caption", "a } b", "{meta.{x}}", "{}", "{folder!}"])
def test_unknown_syntax_fails(bad: str) -> None:
    with pytest.raises(ValueError, match="prompt"):
        parse(bad)


def test_config_load_names_the_mode_and_key() -> None:
    with pytest.raises(ValueError, match=r"mode 'alt', key prompt: unknown template field \{foo\}"):
        ModeConfig(name="alt", prompt="Say {foo}.")
    with pytest.raises(ValueError, match=r"mode 'mix', key prompts.1.prompt: .* is not closed"):
        ModeConfig.model_validate({"name": "mix", "prompts": [{"prompt": "ok {meta.caption?}"}, {"prompt": "x {"}]})


def test_modes_fill_per_row_and_count_missing_values(caplog: pytest.LogCaptureFixture) -> None:
    modes = resolve_modes([ModeConfig(name="alt", prompt="Caption it. Alt: {meta.caption}."),
                           ModeConfig(name="tags", type="booru_like", length=20, extra=("name",),
                                      character_name="{Bob}")],
                          Defaults())
    assert "{{Bob}}" in modes[1].instructions[0]  # catalog text is literal: a brace in a name stays a brace
    modes_module.MISSING_FIELDS.clear()
    rows = row_instructions(modes, 0, ["a.jpg", "b.jpg"], [META, None])
    assert rows[0][0] == "Caption it. Alt: a red barn at dusk." and rows[1][0] == "Caption it. Alt: ."
    assert "{Bob}" in rows[0][1] and "{{Bob}}" not in rows[0][1]
    assert modes_module.MISSING_FIELDS == {"alt {meta.caption}": 1}
    assert "template field {meta.caption} has no value for b.jpg" in caplog.text


def test_mode_fields_take_the_earlier_caption_whole_and_bare_names_only_when_required():
    from pipeline.captioning import fields

    long_caption = "word " * 400  # longer than MAX_VALUE_CHARS: a caption is bounded by its max_tokens instead
    text, missing = fields.fill("Shorten: {mode.description}", "k", None, {"description": long_caption})
    assert text == "Shorten: " + long_caption.strip() and not missing
    assert fields.fill("A. Tags: {mode.tags?}. B.", "k", None, {})[0] == "A. B."
    assert fields.normalise("{{x}} {description|none}", frozenset({"description"})) == "{{x}} {mode.description|none}"
    assert fields.modes_used("{a} {mode.b} {tags} {meta.a}", frozenset({"a"})) == ["a", "b"]
    try:
        fields.parse("{description}")
    except ValueError as err:
        assert "{mode.NAME}" in str(err)
    else:
        raise AssertionError("a bare unknown name must fail")
