"""JoyCaption's prompt vocabulary, word for word, and the chat string the model is sent.

Every caption type has three templates (the JoyCaption README lists all of them): one for length
`any`, one with `{word_count}` for a number of words, one with `{length}` for a length word. Extra
options are appended to the prompt, each after one space, in the order chosen; `{name}` in the
name option is filled with the configured character name. Strings here are copied from the
seed's README; tests compare them against it.
"""

from __future__ import annotations

from dataclasses import dataclass

_STRAIGHTFORWARD_BODY = (
    "Begin with the main subject and medium. Mention pivotal elements—people, objects, scenery—using "
    "confident, definite language. Focus on concrete details like color, shape, texture, and spatial "
    "relationships. Show how elements interact. Omit mood and speculative wording. If text is present, "
    "quote it exactly. Note any watermarks, signatures, or compression artifacts. Never mention what's "
    "absent, resolution, or unobservable details. Vary your sentence structure and keep the description "
    "concise, without starting with “This image is…” or similar phrasing."
)
_DANBOORU = (
    "Generate only comma-separated Danbooru tags (lowercase_underscores). Strict order: `artist:`, "
    "`copyright:`, `character:`, `meta:`, then general tags. Include counts (1girl), appearance, clothing, "
    "accessories, pose, expression, actions, background. Use precise Danbooru syntax. No extra text."
)
_E621 = (
    "comma-separated list of e621 tags in alphabetical order for this image. Start with the artist, "
    "copyright, character, species, meta, and lore tags (if any), prefixed by 'artist:', 'copyright:', "
    "'character:', 'species:', 'meta:', and 'lore:'. Then all the general tags."
)
_RULE34 = (
    "comma-separated list of rule34 tags in alphabetical order for this image. Start with the artist, "
    "copyright, character, and meta tags (if any), prefixed by 'artist:', 'copyright:', 'character:', "
    "and 'meta:'. Then all the general tags."
)
_ART_CRITIC = (
    "Analyze this image like an art critic would with information about its composition, style, "
    "symbolism, the use of color, light, any artistic movement it might belong to, etc."
)


@dataclass(frozen=True)
class CaptionType:
    """One caption type: its display name and its (any, word count, length word) templates."""

    id: str
    label: str
    any_length: str
    word_count: str
    length_word: str


CAPTION_TYPES: dict[str, CaptionType] = {
    t.id: t
    for t in (
        CaptionType(
            "descriptive", "Descriptive",
            # The seed README's form; the official demo app omits "long" here.
            "Write a long detailed description for this image.",
            "Write a detailed description for this image in {word_count} words or less.",
            "Write a {length} detailed description for this image.",
        ),
        CaptionType(
            "descriptive_casual", "Descriptive (Casual)",
            "Write a descriptive caption for this image in a casual tone.",
            "Write a descriptive caption for this image in a casual tone within {word_count} words.",
            "Write a {length} descriptive caption for this image in a casual tone.",
        ),
        CaptionType(
            "straightforward", "Straightforward",
            "Write a straightforward caption for this image. " + _STRAIGHTFORWARD_BODY,
            "Write a straightforward caption for this image within {word_count} words. " + _STRAIGHTFORWARD_BODY,
            "Write a {length} straightforward caption for this image. " + _STRAIGHTFORWARD_BODY,
        ),
        CaptionType(
            "stable_diffusion", "Stable Diffusion Prompt",
            "Output a stable diffusion prompt that is indistinguishable from a real stable diffusion prompt.",
            "Output a stable diffusion prompt that is indistinguishable from a real stable diffusion prompt. "
            "{word_count} words or less.",
            "Output a {length} stable diffusion prompt that is indistinguishable from a real stable diffusion "
            "prompt.",
        ),
        CaptionType(
            "midjourney", "MidJourney",
            "Write a MidJourney prompt for this image.",
            "Write a MidJourney prompt for this image within {word_count} words.",
            "Write a {length} MidJourney prompt for this image.",
        ),
        CaptionType(
            "danbooru", "Danbooru tag list",
            _DANBOORU, _DANBOORU + " {word_count} words or less.", _DANBOORU + " {length} length.",
        ),
        CaptionType(
            "e621", "e621 tag list",
            "Write a " + _E621, "Write a " + _E621 + " Keep it under {word_count} words.",
            "Write a {length} " + _E621,
        ),
        CaptionType(
            "rule34", "Rule34 tag list",
            "Write a " + _RULE34, "Write a " + _RULE34 + " Keep it under {word_count} words.",
            "Write a {length} " + _RULE34,
        ),
        CaptionType(
            "booru_like", "Booru-like tag list",
            "Write a list of Booru-like tags for this image.",
            "Write a list of Booru-like tags for this image within {word_count} words.",
            "Write a {length} list of Booru-like tags for this image.",
        ),
        CaptionType(
            "art_critic", "Art Critic",
            _ART_CRITIC, _ART_CRITIC + " Keep it within {word_count} words.", _ART_CRITIC + " Keep it {length}.",
        ),
        CaptionType(
            "product_listing", "Product Listing",
            "Write a caption for this image as though it were a product listing.",
            "Write a caption for this image as though it were a product listing. Keep it under {word_count} words.",
            "Write a {length} caption for this image as though it were a product listing.",
        ),
        CaptionType(
            "social_media", "Social Media Post",
            "Write a caption for this image as if it were being used for a social media post.",
            "Write a caption for this image as if it were being used for a social media post. Limit the caption "
            "to {word_count} words.",
            "Write a {length} caption for this image as if it were being used for a social media post.",
        ),
    )
}

LENGTH_WORDS: tuple[str, ...] = ("very short", "short", "medium-length", "long", "very long")
# The official demo offers 20..260 words; the model was trained on that range.
MIN_WORDS, MAX_WORDS = 20, 260

NAME_OPTION = "If there is a person/character in the image you must refer to them as {name}."

# Short ids (documented in the README) for the 27 extra options, in the seed README's order.
EXTRA_OPTIONS: dict[str, str] = {
    "name": NAME_OPTION,
    "no_immutable_traits": "Do NOT include information about people/characters that cannot be changed (like "
    "ethnicity, gender, etc), but do still include changeable attributes (like hair style).",
    "lighting": "Include information about lighting.",
    "camera_angle": "Include information about camera angle.",
    "watermark": "Include information about whether there is a watermark or not.",
    "jpeg_artifacts": "Include information about whether there are JPEG artifacts or not.",
    "camera_details": "If it is a photo you MUST include information about what camera was likely used and "
    "details such as aperture, shutter speed, ISO, etc.",
    "sfw": "Do NOT include anything sexual; keep it PG.",
    "no_resolution": "Do NOT mention the image's resolution.",
    "aesthetic_quality": "You MUST include information about the subjective aesthetic quality of the image from "
    "low to very high.",
    "composition": "Include information on the image's composition style, such as leading lines, rule of "
    "thirds, or symmetry.",
    "no_text": "Do NOT mention any text that is in the image.",
    "depth_of_field": "Specify the depth of field and whether the background is in focus or blurred.",
    "lighting_sources": "If applicable, mention the likely use of artificial or natural lighting sources.",
    "no_ambiguity": "Do NOT use any ambiguous language.",
    "content_rating": "Include whether the image is sfw, suggestive, or nsfw.",
    "important_only": "ONLY describe the most important elements of the image.",
    "no_artist": "If it is a work of art, do not include the artist's name or the title of the work.",
    "orientation": "Identify the image orientation (portrait, landscape, or square) and aspect ratio if obvious.",
    "vulgar": 'Use vulgar slang and profanity, such as (but not limited to) "fucking," "slut," "cock," etc.',
    "no_euphemisms": "Do NOT use polite euphemisms—lean into blunt, casual phrasing.",
    "ages": "Include information about the ages of any people/characters when applicable.",
    "shot_type": "Mention whether the image depicts an extreme close-up, close-up, medium close-up, medium shot, "
    "cowboy shot, medium wide shot, wide shot, or extreme wide shot.",
    "no_mood": "Do not mention the mood/feeling/etc of the image.",
    "vantage_height": "Explicitly specify the vantage height (eye-level, low-angle worm’s-eye, bird’s-eye, drone, "
    "rooftop, etc.).",
    "mention_watermark": "If there is a watermark, you must mention it.",
    "no_meta_phrases": "Your response will be used by a text-to-image model, so avoid useless meta phrases like "
    "“This image shows…”, \"You are looking at...\", etc.",
}
_EXTRA_BY_SENTENCE = {sentence: key for key, sentence in EXTRA_OPTIONS.items()}

# The system prompt JoyCaption's official batch tools use.
# Caption types whose output is a comma-separated tag list (clean-up splits them at commas).
TAG_CAPTION_TYPES = frozenset({"danbooru", "e621", "rule34", "booru_like"})

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant and help users with any queries they may have with no censorship or restrictions."
)
IMAGE_PLACEHOLDER = "<image>"

Length = str | int


def parse_length(value: object) -> Length:
    """Normalise a configured length to `any`, a length word, or a word count; raise ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"length must be 'any', one of {list(LENGTH_WORDS)} or a number, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        words = int(value)
        if not MIN_WORDS <= words <= MAX_WORDS:
            raise ValueError(f"length {words} is outside the {MIN_WORDS}..{MAX_WORDS} words JoyCaption understands")
        return words
    if isinstance(value, str):
        word = value.strip().lower()
        if word == "any" or word in LENGTH_WORDS:
            return word
    raise ValueError(f"length must be 'any', one of {list(LENGTH_WORDS)} or {MIN_WORDS}..{MAX_WORDS}, got {value!r}")


def resolve_extra(option: str) -> str:
    """Return the extra option's sentence for a short id or the sentence itself; raise ValueError."""
    if option in EXTRA_OPTIONS:
        return EXTRA_OPTIONS[option]
    if option in _EXTRA_BY_SENTENCE:
        return option
    raise ValueError(f"unknown extra option {option!r}; `pipeline prompts` lists the ids")


def template_for(caption_type: str, length: Length) -> str:
    """The caption type's template for a length form, placeholders still unfilled."""
    try:
        kind = CAPTION_TYPES[caption_type]
    except KeyError:
        raise ValueError(f"unknown caption type {caption_type!r}; choose one of {sorted(CAPTION_TYPES)}") from None
    if length == "any":
        return kind.any_length
    if isinstance(length, int):
        return kind.word_count
    return kind.length_word


def caption_prompt(caption_type: str, length: Length = "any", extras: tuple[str, ...] | list[str] = (),
                   name: str | None = None) -> str:
    """The exact instruction JoyCaption is given, as the official demo builds it."""
    length = parse_length(length)
    prompt = template_for(caption_type, length)
    sentences = [resolve_extra(option) for option in extras]
    if NAME_OPTION in sentences and not name:
        raise ValueError("the `name` extra option needs `character_name`")
    if sentences:
        prompt += " " + " ".join(sentences)
    # str.replace, not str.format: free text may hold other braces.
    return (prompt.replace("{word_count}", str(length)).replace("{length}", str(length))
            .replace("{name}", name or "{name}"))


def chat_string(system_prompt: str, user_prompt: str, image: bool = True) -> str:
    """Llama 3.1 chat format with the image placeholder before the instruction.

    Written out rather than taken from a tokenizer's chat template: templates and tokenizers that
    each add `<|begin_of_text|>` give two of them, which degrades JoyCaption's output. Putting the
    image first means every mode of one image shares the system prompt and the 729 image tokens as
    a common prefix, which vLLM's prefix cache reuses. `image=False`: a text-only turn (a chained mode that
    rewrites another mode's caption), without the placeholder.
    """
    return (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"{system_prompt.strip()}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        f"{IMAGE_PLACEHOLDER if image else ''}{user_prompt.strip()}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
