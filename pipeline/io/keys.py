"""Row keys: unique across the whole input, stable across runs, safe as relative file names.

- folder: the file's path relative to input.uri (`a/b/cat.jpg`);
- webdataset: `<tar path relative to input.uri, without .tar>/<sample key>` (`a/000000/s0`); a single
  tar as input.uri: `<its name without .tar>/<sample key>`;
- parquet: `<file path relative to input.uri, without .parquet>/<row in the file, 8 digits>`
  (`x/part-0/00000012`);
- file list: `<scheme>/<rest of the URI>`; a local path has scheme `file` (`s3://b/x.jpg` ->
  `s3/b/x.jpg`, `/b/x.jpg` and `file:///b/x.jpg` -> `file/b/x.jpg`).

Every key is made of `/`-separated components, none of them empty, `.` or `..`, and it never starts
with `/`. A component that would be one of those (`a//b`, `../x`) is escaped by a leading `%`, and so is
a component that already looks escaped (`%`, `%.`, `%%..` ...): the map stays one-to-one, so two different
paths never share a key. Ordinary names, `%` inside them included, are left alone.

One limit, from dropping the extension: a tar `x.tar` beside a folder `x/` of tars could give a key twice
(`x.tar` holding sample `y/s1` and `x/y.tar` holding `s1` are both `x/y/s1`); keys within one container
are always unique (see pipeline.io.tar_source).
"""

from __future__ import annotations

import posixpath
import re

_ESCAPED = re.compile(r"%*(\.\.?)?")  # components that are escaped: %...% followed by "", "." or ".."


def safe_component(part: str) -> str:
    return "%" + part if _ESCAPED.fullmatch(part) else part


def safe_key(path: str) -> str:
    """`path` as a key: its components kept, the ones that cannot be file names escaped (see module doc)."""
    return "/".join(safe_component(part) for part in path.split("/"))


def strip_extension(relative: str) -> str:
    """`a/000000.tar` -> `a/000000`: the last suffix of the base name goes, folders stay."""
    directory, name = posixpath.split(relative)
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    return f"{directory}/{stem}" if directory else stem


def container_prefix(relative: str | None, uri: str) -> str:
    """The key prefix of a tar or Parquet file: its path relative to input.uri without the extension.

    `relative` is "" when input.uri is the file itself (then its base name counts), and None in plans
    written before keys had folders (then the base name counts too, as it did)."""
    name = relative or posixpath.basename(uri.rstrip("/"))
    return safe_key(strip_extension(name))


def resolve_list_entry(line: str, list_folder: str) -> str:
    """A file-list line as the URI it names.

    `scheme://...` is taken as written; `file://` is dropped to a local path; an absolute local path is
    taken as written; anything else is relative to the folder holding the list (a local path, or a
    `scheme://bucket/prefix` URI), with `.` and `..` resolved."""
    if line.lower().startswith("file://"):
        line = line[len("file://"):]
    elif "://" in line:
        return line
    if line.startswith("/"):
        return line
    scheme, separator, rest = list_folder.partition("://")
    if not separator:
        return posixpath.normpath(posixpath.join(list_folder, line))
    resolved = posixpath.normpath(posixpath.join(rest, line))
    # Above the bucket is meaningless; keep the line as written under the folder (it fails to read).
    return f"{scheme}://{resolved if not resolved.startswith('..') else posixpath.join(rest, line)}"


def list_entry_key(uri: str) -> str:
    """The key of a resolved file-list entry: `<scheme>/<rest>` (see module doc)."""
    scheme, separator, rest = uri.partition("://")
    if not separator:  # a local absolute path: one leading slash is the root, not an empty component
        scheme, rest = "file", uri[1:] if uri.startswith("/") else uri
    return f"{safe_component(scheme)}/{safe_key(rest)}"
