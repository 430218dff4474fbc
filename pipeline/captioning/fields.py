"""Template fields in instructions, filled per image from its row: `Describe this image. Its alt text: {meta.caption?}`.

A field is `{NAME}`, `{NAME?}` or `{NAME|default text}`; `{{` and `}}` are literal braces. Names:

- `meta.KEY` (`meta.KEY.SUB`, ...): the row's `meta` JSON (io/meta.py): `meta.caption` is the alt text,
  `meta.url`, `meta.json.FIELD` a sidecar's JSON field, `meta.columns.NAME` a Parquet input column
- `column.NAME`: a Parquet input column the row carries (`meta.columns.NAME`)
- `sidecar`: the image's `.txt` sidecar or member (`meta.txt`), else its `.json` as compact JSON
- `tags`: a `tags` value of the meta, its `.json` or its columns (a list joined with `, `)
- `folder`: the image's parent folder name, from its key (empty at the top level)
- `mode.NAME`: the caption of mode NAME of the same image, made earlier in the run (a chained mode: NAME must be
  in the mode's `requires`, captioning/modes.py). In a mode that requires NAME, a bare `{NAME}` means the same
  (and shadows a built-in field of that name: a mode requiring `tags` reads the `tags` mode with `{tags}`)

Missing values (absent, null or blank): `{NAME?}` drops the whole sentence holding it (a sentence ends at `.`,
`!` or `?` followed by a space, or at a line break, in the template's own text), `{NAME|text}` puts `text`
instead, and a plain `{NAME}` becomes empty and counts as a missing value (the engine logs a warning with
the count): a data problem, not an error row. Values are inserted as they are (lists joined with `, `,
objects as JSON), stripped and cut to MAX_VALUE_CHARS characters. A template is checked when the config
loads (`parse` raises ValueError); the instruction stored in `<mode>_prompt` is the filled one.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MAX_VALUE_CHARS = 1000
NAME = re.compile(r"(meta|column)\.[^{}|?.\s][^{}|?]*|mode\.[a-z][a-z0-9_]*|sidecar|tags|folder")
MODE_PREFIX = "mode."
SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+|\n")


@dataclass(frozen=True)
class Field:
    name: str
    optional: bool = False  # `{name?}`: drop the sentence when missing
    default: str | None = None  # `{name|text}`


Token = str | Field


@lru_cache(maxsize=256)
def parse(template: str, chained: frozenset[str] = frozenset()) -> tuple[Token, ...]:
    """The template as literal text and fields; ValueError naming the bad place for anything else in braces.
    `chained`: the mode names a bare `{NAME}` may name (the mode's `requires`), parsed as `mode.NAME`."""
    tokens: list[Token] = []
    text: list[str] = []
    at = 0
    while at < len(template):
        char = template[at]
        if template.startswith("{{", at) or template.startswith("}}", at):
            text.append(char)
            at += 2
            continue
        if char == "}":
            raise ValueError(f"a lone '}}' at character {at} of the prompt (write '}}}}' for a brace)")
        if char != "{":
            text.append(char)
            at += 1
            continue
        end = template.find("}", at)
        if end < 0:
            raise ValueError(f"'{{' at character {at} of the prompt is not closed (write '{{{{' for a brace)")
        tokens.append("".join(text))
        text = []
        tokens.append(_field(template[at + 1:end], at, chained))
        at = end + 1
    tokens.append("".join(text))
    return tuple(token for token in tokens if token != "")


def _field(body: str, at: int, chained: frozenset[str] = frozenset()) -> Field:
    name, bar, default = body.partition("|")
    optional = not bar and name.endswith("?")
    name = name[:-1] if optional else name
    name = name.strip()
    if name in chained:  # a required mode's caption, before any built-in field of the same name
        name = MODE_PREFIX + name
    if "{" in body or not NAME.fullmatch(name):
        raise ValueError(f"unknown template field {{{body}}} at character {at} of the prompt; fields are "
                         "{meta.KEY}, {column.NAME}, {sidecar}, {tags}, {folder} and {mode.NAME} (a mode this "
                         "one `requires`), each optionally {NAME?} or {NAME|default} (write '{{' and '}}' for "
                         "literal braces)")
    return Field(name, optional, default if bar else None)


def modes_used(template: str, chained: frozenset[str] = frozenset()) -> list[str]:
    """The mode names the template reads (`{mode.NAME}`, or a bare required name), in order of appearance."""
    return [token.name[len(MODE_PREFIX):] for token in parse(template, chained)
            if isinstance(token, Field) and token.name.startswith(MODE_PREFIX)]


def normalise(template: str, chained: frozenset[str]) -> str:
    """The template with each bare required-mode field spelled `{mode.NAME}`: one spelling for the run (the
    engine fills it without knowing `requires`, and the fingerprint does not change with the spelling)."""
    pieces = []
    for token in parse(template, chained):
        if isinstance(token, str):
            pieces.append(literal(token))
            continue
        suffix = "?" if token.optional else f"|{token.default}" if token.default is not None else ""
        pieces.append("{" + token.name + suffix + "}")
    return "".join(pieces)


def has_fields(template: str) -> bool:
    return any(isinstance(token, Field) for token in parse(template))


def literal(text: str) -> str:
    """`text` as a template that means exactly itself (braces doubled)."""
    return text.replace("{", "{{").replace("}", "}}")


def _meta(meta: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if isinstance(meta, Mapping):
        return meta
    if not meta:
        return {}
    try:
        value = json.loads(meta)
    except ValueError:
        return {}
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple):
        text = ", ".join(part for part in (_text(item) for item in value) if part)
    elif isinstance(value, Mapping):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    text = text.strip()[:MAX_VALUE_CHARS]
    return text or None


def _path(value: Any, parts: list[str]) -> Any:
    """`value[a][b]...` for parts a.b...; a key holding dots itself (a Parquet column `a.b`) is tried first."""
    if not parts:
        return value
    if not isinstance(value, Mapping):
        return None
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        if name in value:
            found = _path(value[name], parts[cut:])
            if found is not None:
                return found
    return None


def value_of(name: str, key: str, meta: Mapping[str, Any], earlier: Mapping[str, str] | None = None) -> str | None:
    """The field's text for one row, or None when the row has no value for it. `earlier`: this image's captions
    of the modes run before this one (chained modes), by mode name."""
    if name.startswith(MODE_PREFIX):  # whole: a caption is bounded by its mode's max_tokens, not MAX_VALUE_CHARS
        return ((earlier or {}).get(name[len(MODE_PREFIX):]) or "").strip() or None
    if name == "folder":
        return posixpath.basename(posixpath.dirname(key.replace("\\", "/"))) or None
    if name == "sidecar":
        txt = meta.get("txt")
        return _text(txt) if isinstance(txt, str) and txt.strip() else _text(meta.get("json"))
    if name == "tags":
        for holder in (meta, meta.get("json"), meta.get("columns")):
            if isinstance(holder, Mapping) and _text(holder.get("tags")):
                return _text(holder.get("tags"))
        return None
    kind, _dot, rest = name.partition(".")
    if kind == "column":
        return _text(_path(meta.get("columns"), rest.split(".")))
    return _text(_path(meta, rest.split(".")))


def fill(template: str, key: str, meta: str | Mapping[str, Any] | None,
         earlier: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """The instruction for one row and the names of the plain fields it had no value for (filled empty).
    `earlier`: the row's captions of the modes this one requires (`{mode.NAME}`)."""
    tokens = parse(template)
    if not any(isinstance(token, Field) for token in tokens):
        return "".join(token for token in tokens if isinstance(token, str)), []
    row = _meta(meta)
    missing: list[str] = []
    sentences: list[list[str]] = [[]]  # each: rendered pieces; a sentence's last piece keeps its separator
    dropped = [False]
    for token in tokens:
        if isinstance(token, Field):
            value = value_of(token.name, key, row, earlier)
            if value is None:
                if token.optional:
                    dropped[-1] = True
                elif token.default is not None:
                    value = token.default
                else:
                    missing.append(token.name)
            sentences[-1].append(value or "")
            continue
        at = 0
        for match in SENTENCE_END.finditer(token):
            sentences[-1].append(token[at:match.end()])
            sentences.append([])
            dropped.append(False)
            at = match.end()
        sentences[-1].append(token[at:])
    kept = ["".join(pieces) for pieces, drop in zip(sentences, dropped, strict=True) if not drop]
    return "".join(kept).strip(), missing
