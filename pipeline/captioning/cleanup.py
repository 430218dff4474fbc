"""Caption clean-up, per mode and off by default: meta openings, whitespace, tag lists.

JoyCaption's README asks for captions without "useless meta phrases like 'This image shows…'", and its
tag modes mix `long_hair` with `long hair` and repeat tags when they loop. These rules fix that text
after generation, in the write stage (stages.py), never inside the caption actor's hot loop. They work
on the model's own text: a mode's `prepend`/`append` are taken off first and put back after, and the
text as generated is kept in the `<mode>_raw` column, so nothing is lost and any rule can be redone.

The rules are conservative: a meta opening is removed only at the very start, only when what follows
is a whole phrase (never a fragment such as "that the dog is ..."), and only when the opening carries
no meaning of its own: "This image shows a cat" becomes "A cat", but "This photograph shows a cat"
becomes "A photograph of a cat", because the medium is information. `RULES_VERSION` is part of a mode's
fingerprint when clean-up is on: change what a rule does, and raise it.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.captioning.specs import CleanupConfig, TagCleanup

RULES_VERSION = 1

# Nouns that name the picture without saying what kind it is: an opening built on them is pure meta.
_GENERIC = r"image|picture|pic"
# Nouns that say what kind of picture it is: worth keeping when the opening goes.
_MEDIUM = (r"photo|photograph|snapshot|selfie|painting|illustration|drawing|sketch|artwork|render|rendering|"
           r"screenshot|cartoon|comic|poster|meme|collage|watercolou?r|print|infographic|diagram|portrait|close-up|closeup")
_MEDIUM_ADJECTIVE = (r"digital|close-up|black-and-white|vintage|colou?r|watercolou?r|oil|pencil|charcoal|ink|3d|"
                     r"cgi|anime|cartoon|realistic|photorealistic|stylized|stylised")
_SHOW_VERB = (r"shows|depicts|features|displays|presents|portrays|captures|showcases|illustrates|"
              r"is showing|is depicting|is displaying|is featuring")
_FLAGS = re.IGNORECASE | re.DOTALL

# "This image shows a cat" -> "a cat"; "The picture depicts: a cat" -> "a cat".
_GENERIC_SHOWS = re.compile(rf"^(?:this|the)\s+(?:{_GENERIC})\s+(?:{_SHOW_VERB}):?\s+(?P<rest>.+)$", _FLAGS)
# "This digital illustration depicts a knight" -> "A digital illustration of" + "a knight".
_MEDIUM_SHOWS = re.compile(rf"^(?:this|the)\s+(?P<medium>(?:(?:{_MEDIUM_ADJECTIVE})\s+)?(?:{_MEDIUM}))\s+"
                           rf"(?:{_SHOW_VERB}):?\s+(?P<rest>.+)$", _FLAGS)
# Words a modifier before the medium noun is never: "This is a reason to print ..." is no picture.
_LINKING = r"(?:to|of|or|but|for|with|in|on|at|that|which|who|my|your|our|their|his|her|its)"
# "This image is a photograph of a dog" / "This is a photo of a dog" -> "a photograph of a dog": the
# noun phrase after the article must end, within a few words, in a medium noun (so "This is a mood." and
# "This image is a bit blurry" stay as they are).
_IS_A_MEDIUM = re.compile(rf"^(?:(?:this|the)\s+(?:{_GENERIC}|photo|photograph)\s+is|this\s+is|it\s+is|it's|"
                          rf"here\s+is|here's)\s+(?P<rest>an?\s+(?:(?!{_LINKING}\b)[\w'-]+\s+){{0,4}}?"
                          rf"(?:{_GENERIC}|{_MEDIUM})\b.+)$", _FLAGS)
# After the rule above: "an image of a cat" carries nothing; "a close-up image of a cat" does, and stays.
_AN_IMAGE_OF = re.compile(rf"^an?\s+(?:{_GENERIC})\s+(?:of|showing|depicting)\s+(?P<rest>.+)$", _FLAGS)
# "In this image, a man walks" -> "a man walks"; "In the picture we can see a dog" -> "a dog".
_IN_THE_IMAGE = re.compile(rf"^in\s+(?:this|the)\s+(?:{_GENERIC})\s*,?\s+(?:(?:we|you|i|one)\s+(?:can\s+)?see\s+)?"
                           r"(?P<rest>.+)$", _FLAGS)
# "You are looking at a photo of ..." (the README's second example of a meta phrase), "We can see ...".
_LOOKING_AT = re.compile(r"^(?:(?:you|we)\s+are|you're|we're)\s+looking\s+at\s+(?P<rest>.+)$"
                         r"|^(?:we|you)\s+can\s+see\s+(?P<rest2>.+)$", _FLAGS)
# A lead-in line: "Here is a description of the image:", "Sure! Here's a detailed caption for it:",
# "Here are the tags:", and the bare labels "Caption:", "Prompt:", "Tags:".
_LEAD_IN = re.compile(r"^(?:(?:sure|okay|ok|certainly|of course)[!,.]?\s+)?(?:here\s+is|here's|here\s+are|"
                      r"below\s+is|below\s+are)\s+(?:[\w'-]+\s+){0,6}?(?:description|caption|prompt|tags|"
                      r"tag\s+list|list\s+of\s+tags|analysis)\b[^:\n]{0,60}:\s*(?P<rest>.+)$"
                      r"|^(?:caption|prompt|tags)\s*:\s*(?P<rest2>.+)$", _FLAGS)

# Words a whole phrase does not start with: after an opening, they mean a fragment is left
# ("The image shows that ...", "This image shows how ...", "The image shows off ...", "... shows no ...").
_FRAGMENT_STARTS = frozenset({
    "that", "how", "what", "whether", "if", "why", "where", "when", "which", "who", "whom", "whose", "to", "is",
    "are", "was", "were", "be", "been", "being", "and", "but", "or", "nor", "so", "of", "with", "by", "for", "from",
    "as", "than", "off", "up", "us", "you", "me", "him", "her", "them", "it", "its", "itself", "no", "not", "nothing",
    "none"})
_MIN_WORDS_LEFT = 2  # "This image shows cats." is left alone: "Cats." says less than it did
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def normalise_whitespace(text: str) -> str:
    """Runs of spaces and tabs become one space, lines are trimmed, 3+ line breaks become a blank line.

    Line breaks themselves stay (an art-critic caption's paragraphs are content); zero-width joiners
    inside emoji are not whitespace and stay too."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _whole_phrase(rest: str) -> bool:
    """Whether `rest`, what an opening leaves, can stand as a caption on its own."""
    words = _WORD.findall(rest)
    if len(words) < _MIN_WORDS_LEFT:
        return False
    if not (rest[0].isalnum() or rest[0] in "\"“‘'"):
        return False
    return words[0].lower() not in _FRAGMENT_STARTS


def capitalise(text: str) -> str:
    """Upper-case the first letter, unless the first word is mixed case by design (iPhone, eBay)."""
    if not text or not text[0].islower():
        return text
    if len(text) > 1 and text[1].isupper():
        return text
    return text[0].upper() + text[1:]


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _strip_once(text: str) -> str | None:
    """The text without its meta opening when one rule applies (capitalised), else None."""
    rest: str | None = None
    if match := _LEAD_IN.match(text):
        rest = match.group("rest") or match.group("rest2")
        # A lead-in line ends at its colon; what follows is the caption whatever its first word, and it keeps
        # its case ("Tags: masterpiece, 1girl" must not become "Masterpiece, 1girl").
        return rest.strip() if _WORD.search(rest) else None
    if match := _GENERIC_SHOWS.match(text):
        rest = match.group("rest")
    elif match := _MEDIUM_SHOWS.match(text):
        if not _whole_phrase(match.group("rest")):
            return None
        medium = match.group("medium").lower()
        return f"{_article(medium)} {medium} of {match.group('rest')}"
    elif match := _IS_A_MEDIUM.match(text):
        rest = match.group("rest")
        if generic := _AN_IMAGE_OF.match(rest):
            rest = generic.group("rest")
    elif match := _IN_THE_IMAGE.match(text):
        rest = match.group("rest")
    elif match := _LOOKING_AT.match(text):
        rest = match.group("rest") or match.group("rest2")
    if rest is None or not _whole_phrase(rest):
        return None
    return capitalise(rest)


def strip_meta_opening(text: str) -> str:
    """`text` without a leading meta phrase ("This image shows", "In this image,", "Here is a description
    of the image:"); unchanged when none is there or removing it would leave a fragment or nothing.

    Two passes at most, for a lead-in followed by an opening ("Here is a caption: This image shows ...")."""
    for _ in range(2):
        stripped = _strip_once(text)
        if stripped is None or stripped == text:
            break
        text = stripped
    return text


# Danbooru's emoticon tags, where the underscore is the face, not a space.
_FACE_TAGS = frozenset({"o_o", "0_0", "o_0", "0_o", "x_x", "t_t", "u_u", "^_^", ">_<", "-_-", ";_;", "=_=", "@_@",
                        "._.", "+_+", ">_o", "o_<", "^_-", "-_^", "|_|", "n_n"})
_PREFIX = re.compile(r"^(artist|copyright|character|species|meta|lore|general):\s+", re.IGNORECASE)


_WORD_CHARACTER = re.compile(r"[^\W_]")
_TAG_SEPARATOR = re.compile(r"[,\n]")


def _is_face(tag: str) -> bool:
    return tag.lower() in _FACE_TAGS or _WORD_CHARACTER.search(tag) is None


def restyle_tag(tag: str, style: str, face: bool | None = None) -> str:
    """One tag with its words joined by spaces (`long hair`), underscores (`long_hair`), or as it was.
    `face`: whether the tag is an emoticon, when the caller knows already."""
    if style == "as_is" or (_is_face(tag) if face is None else face):
        return tag
    if style == "spaces":
        return " ".join(tag.replace("_", " ").split())
    return "_".join(_PREFIX.sub(r"\1:", tag).split())


def _tag_identity(tag: str, face: bool) -> str:
    """What two spellings of one tag share: `Long_Hair`, `long hair` and `long  hair` are one tag."""
    return tag.lower() if face else " ".join(tag.lower().replace("_", " ").split())


def clean_tags(text: str, settings: TagCleanup) -> str:
    """A comma- (or line-) separated tag list, each tag trimmed, restyled, lower-cased and deduplicated
    as configured, joined by the configured separator. Empty tags (", ,") go; order stays."""
    tags: list[str] = []
    seen: set[str] = set()
    for part in _TAG_SEPARATOR.split(text):
        tag = " ".join(part.split())
        if not tag:
            continue
        face = _is_face(tag)  # restyling and lower-casing keep a face a face
        tag = restyle_tag(tag, settings.style, face)
        if settings.lowercase:
            tag = tag.lower()
        if settings.dedupe:
            identity = _tag_identity(tag, face)
            if identity in seen:
                continue
            seen.add(identity)
        tags.append(tag)
    return settings.separator.join(tags) if tags else text


def clean_caption(text: str, settings: CleanupConfig) -> str:
    """The model's text with the mode's clean-up applied: whitespace, then the meta opening, then tags."""
    if settings.normalise_whitespace:
        text = normalise_whitespace(text)
    if settings.strip_meta_openings:
        text = strip_meta_opening(text)
    if settings.tags is not None:
        text = clean_tags(text, settings.tags)
    return text


def clean_column(values: list[str | None], prepend: str, append: str,
                 settings: CleanupConfig) -> tuple[list[str | None], list[str | None]]:
    """(cleaned captions, the model's raw text) for one mode's column as the caption actor wrote it.

    The actor writes `prepend + text + append`; the clean-up applies to `text` alone and the mode's
    fixed text goes back around it. A null (an error row) stays null in both."""
    cleaned: list[str | None] = []
    raw: list[str | None] = []
    for value in values:
        if value is None:
            cleaned.append(None)
            raw.append(None)
            continue
        # Only what is really there is taken off and put back: never a second copy of the fixed text.
        head = prepend if prepend and value.startswith(prepend) else ""
        rest = value[len(head):]
        tail = append if append and rest.endswith(append) else ""
        text = rest[: len(rest) - len(tail)]
        raw.append(text)
        cleaned.append(head + clean_caption(text, settings) + tail)
    return cleaned, raw


def describe(settings: CleanupConfig) -> dict[str, Any]:
    """The clean-up as the manifest, the part files' metadata and the fingerprint record it."""
    return {**settings.model_dump(mode="json"), "rules_version": RULES_VERSION}
