"""What a URI means, whatever way a user spelled it.

`~/in`, `./in/`, `file:///home/me/in` and a symlink to that folder all name one folder; `s3a://b/p/` and
`s3://b/p` name one prefix. Runs fingerprint and compare inputs and outputs by this canonical form, so the
same input resumes the same output however it is written, and an output inside its own input is caught
before anything is written.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

# Schemes that name the same store.
SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3"}


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.lower().startswith("file://")


def local_path(uri: str) -> str:
    """A local URI as an absolute, symlink-free path: `~` expanded, `file://` stripped."""
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc.startswith("~"):  # file://~/x: the home folder, as a user means it
            uri = parts.netloc + unquote(parts.path)
        elif parts.netloc in ("", "localhost"):
            uri = unquote(parts.path)
        else:
            raise ValueError(f"{uri!r}: a file:// URI names a file on this machine (file:///path)")
    return os.path.realpath(os.path.expanduser(uri))


def canonical_uri(uri: str) -> str:
    """The one spelling of `uri`: a real local path, or `scheme://bucket/key` without a trailing slash."""
    uri = uri.strip()
    if is_local(uri):
        return local_path(uri)
    scheme, rest = uri.split("://", 1)
    scheme = SCHEME_ALIASES.get(scheme.lower(), scheme.lower())
    return f"{scheme}://{rest.rstrip('/')}" if rest.rstrip("/") else f"{scheme}://{rest}"


def contains(outer: str, inner: str) -> bool:
    """True if canonical URI `inner` is `outer` or lies under it."""
    if is_local(outer) != is_local(inner):
        return False
    if is_local(outer):
        return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)
    return inner == outer or inner.startswith(outer + "/")


def overlap(input_uri: str, output_uri: str) -> str | None:
    """Why an output cannot live where it is given, relative to the input; None when they are apart."""
    source, target = canonical_uri(input_uri), canonical_uri(output_uri)
    if source == target:
        return f"output.uri is the input itself ({target})"
    if contains(source, target):
        return (f"output.uri {target} is inside input.uri {source}: a later listing would take the table for "
                "input. Write the output beside the input instead")
    if contains(target, source):
        return f"input.uri {source} is inside output.uri {target}; write the output elsewhere"
    return None

