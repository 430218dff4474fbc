"""The prompt catalog against the seed README's strings, word for word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.captioning import prompts

SEED_README = Path(__file__).resolve().parents[4] / "shared" / "seed" / "joycaption-README.md"
# README section title -> caption type id
SECTIONS = {
    "Descriptive Caption": "descriptive",
    "Straightforward Caption": "straightforward",
    "Stable Diffusion Prompt": "stable_diffusion",
    "MidJourney": "midjourney",
    "Danbooru tag list": "danbooru",
    "e621 tag list": "e621",
    "Rule34 tag list": "rule34",
    "Booru-Like Tag List": "booru_like",
    "Art Critic Analysis": "art_critic",
    "Product Listing": "product_listing",
    "Social Media Post": "social_media",
}


def _seed_text() -> str:
    if not SEED_README.exists():
        pytest.skip(f"seed README not found at {SEED_README}")
    return SEED_README.read_text()


def _seed_examples() -> dict[str, list[str]]:
    """Caption type id -> the quoted example prompts listed under its README section."""
    text = _seed_text()
    section = text.split("## How to Prompt JoyCaption", 1)[1].split("### Extra Options", 1)[0]
    examples: dict[str, list[str]] = {}
    current = None
    for line in section.splitlines():
        heading = re.match(r"^\d+\. \*\*(.+?)\*\*", line.strip())
        if heading:
            current = SECTIONS[heading.group(1)]
            examples[current] = []
            continue
        quoted = re.match(r'^\s*- "(.*)"\s*$', line)
        if current and quoted:
            examples[current].append(quoted.group(1))
    return examples


def _seed_extras() -> list[str]:
    text = _seed_text()
    block = text.split("### Extra Options", 1)[1].split("### Limitations", 1)[0]
    return [line[2:].strip() for line in block.splitlines() if line.startswith("- ")]


def test_every_caption_type_of_the_seed_is_in_the_catalog():
    examples = _seed_examples()
    assert set(SECTIONS.values()) <= set(prompts.CAPTION_TYPES)
    # Descriptive's README section lists the casual tone's templates too.
    assert len(examples["descriptive"]) == 6
    assert all(len(examples[kind]) == 3 for kind in examples if kind != "descriptive")


@pytest.mark.parametrize("kind", sorted(prompts.CAPTION_TYPES))
def test_templates_match_the_seed_word_for_word(kind: str):
    examples = _seed_examples()
    if kind == "descriptive_casual":
        expected = examples["descriptive"][3:]
    else:
        expected = examples[kind][:3]
    entry = prompts.CAPTION_TYPES[kind]
    assert [entry.any_length, entry.word_count, entry.length_word] == expected


@pytest.mark.parametrize("kind", sorted(prompts.CAPTION_TYPES))
@pytest.mark.parametrize("length", ["any", "very short", "short", "medium-length", "long", "very long", 20, 160,
                                    260])
def test_every_type_and_length_form_fills_its_template(kind: str, length: str | int):
    entry = prompts.CAPTION_TYPES[kind]
    text = prompts.caption_prompt(kind, length)
    if length == "any":
        assert text == entry.any_length
    elif isinstance(length, int):
        assert text == entry.word_count.replace("{word_count}", str(length))
    else:
        assert text == entry.length_word.replace("{length}", length)
    assert "{" not in text


def test_extra_options_match_the_seed_in_order():
    assert list(prompts.EXTRA_OPTIONS.values()) == _seed_extras()
    assert len(prompts.EXTRA_OPTIONS) == 27


def test_extras_append_with_one_space_in_order_and_fill_the_name():
    text = prompts.caption_prompt("descriptive", "long", ["name", "Include information about lighting."], "Ava")
    assert text == ("Write a long detailed description for this image. If there is a person/character in the "
                    "image you must refer to them as Ava. Include information about lighting.")


def test_seed_dual_caption_prompts():
    assert prompts.caption_prompt("booru_like", 50) == "Write a list of Booru-like tags for this image within 50 words."
    assert prompts.caption_prompt("straightforward", 160).startswith(
        "Write a straightforward caption for this image within 160 words. Begin with the main subject")


@pytest.mark.parametrize("bad", [5000, 0, 19, 261, "huge", "", True, 3.5, "-20"])
def test_impossible_lengths_are_refused(bad: object):
    with pytest.raises(ValueError, match="length"):
        prompts.caption_prompt("descriptive", bad)  # type: ignore[arg-type]


def test_unknown_type_and_extra_are_refused():
    with pytest.raises(ValueError, match="unknown caption type 'poem'"):
        prompts.caption_prompt("poem")
    with pytest.raises(ValueError, match="unknown extra option 'sparkles'"):
        prompts.caption_prompt("descriptive", extras=["sparkles"])
    with pytest.raises(ValueError, match="character_name"):
        prompts.caption_prompt("descriptive", extras=["name"])


def test_chat_string_has_one_bos_and_the_image_before_the_instruction():
    chat = prompts.chat_string("You are a helpful image captioner.", "Write a MidJourney prompt for this image.")
    assert chat.count("<|begin_of_text|>") == 1 and chat.startswith("<|begin_of_text|>")
    assert chat.count(prompts.IMAGE_PLACEHOLDER) == 1
    assert chat.index(prompts.IMAGE_PLACEHOLDER) < chat.index("Write a MidJourney prompt")
    assert chat.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
