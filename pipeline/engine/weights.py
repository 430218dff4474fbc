"""Model weights from the user's storage: `model.path: s3://bucket/models/joycaption/` (any fsspec URI).

Each node fetches the folder once into a local cache and every engine of the node is built from there:

    <model.cache_dir or ~/.cache/joycaption-pipeline/models>/<16 hex digits of sha256(uri, revision)>/
    <same>.lock        an exclusive file lock (flock) while a process checks or fetches the folder
    <same>/.fetched.json   what was fetched: every file's name, size and ETag, written last

- **Once per node.** A caption actor takes the lock before it looks. The first fetches; the node's other actors
  wait on the lock (a log line says so), then find the folder complete and fetch nothing. A process that dies
  mid-fetch releases the lock with its death; its half-written temporary folder is removed by the next one.
- **Verified.** Every file's size against the listing; when the folder carries a checksum list (`SHA256SUMS`,
  `sha256sums.txt` or `checksums.sha256`, in `sha256sum`'s format: `<hex>  <name>` a line), each listed file's
  SHA-256; without one, a file whose listed ETag is a plain MD5 (S3 single-part uploads) is checked against it.
  A mismatch fails the fetch naming the file (put a checksum list beside a model whose ETags are not MD5s,
  e.g. under SSE-KMS). The fetch lands in a temporary folder renamed into place only when all of it verified.
- **Reused.** A later run (or actor) lists the URI (a LIST request, no object GET) and compares names, sizes
  and ETags with `.fetched.json`, and the local files' sizes with theirs: all equal, the cache is used as it
  is; anything changed upstream is fetched again.

Names starting with a dot are skipped (`.gitattributes`, `.cache/`), as listings elsewhere in the pipeline do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.io.fs import open_fs, retrying

log = logging.getLogger("pipeline.engine.weights")

DEFAULT_CACHE = "~/.cache/joycaption-pipeline/models"
FETCHED = ".fetched.json"
CHECKSUM_LISTS = ("SHA256SUMS", "sha256sums.txt", "checksums.sha256")
CHUNK = 8 << 20
MD5_ETAG = re.compile(r"[0-9a-f]{32}")


class ModelFetchError(RuntimeError):
    """The model folder could not be fetched or did not verify (the message names the file)."""


def is_remote(path: str) -> bool:
    """Whether `model.path` is a storage URI to fetch (`s3://...`, `gs://...`), not a hub id or local folder."""
    return "://" in path and not path.startswith("file://")


def cache_folder(model: ModelConfig) -> Path:
    """The node-local folder a remote `model.path` is fetched into: one per URI and revision."""
    key = hashlib.sha256(f"{model.path.rstrip('/')}\n{model.revision or ''}".encode()).hexdigest()[:16]
    return Path(os.path.expanduser(model.cache_dir or DEFAULT_CACHE)) / key


@dataclass(frozen=True)
class RemoteFile:
    name: str  # relative to the model folder, with `/`
    size: int
    etag: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "etag": self.etag}


def local_model_path(model: ModelConfig) -> str:
    """The folder the engine is built from: `model.path` itself, or for a URI its verified local copy."""
    if not is_remote(model.path):
        return model.path
    return str(fetch_model(model))


def check_remote_model(model: ModelConfig) -> str | None:
    """For a `model.path` URI, what is wrong with it (no folder there, no config.json in it); None when it looks
    like a model folder, or when storage cannot be asked from here (the caption actors will say why)."""
    if not is_remote(model.path):
        return None
    try:
        fs, root = open_fs(model.path, model.storage_options)
        if retrying(fs.exists, f"{root}/config.json", what=model.path):
            return None
        return f"model.path {model.path} holds no config.json: not a model folder"
    except Exception as err:  # credentials, network: the actors, with the nodes' credentials, try themselves
        log.warning("could not check model.path %s from here (%s: %s); the engines will fetch it",
                    model.path, type(err).__name__, err)
        return None


def with_local_path(model: ModelConfig) -> ModelConfig:
    """`model` as the engine is built from it: a `model.path` URI replaced by this node's local copy."""
    return model.model_copy(update={"path": local_model_path(model)}) if is_remote(model.path) else model


def fetch_model(model: ModelConfig) -> Path:
    """Fetch (or reuse) the model folder at `model.path` into this node's cache; see the module docstring."""
    target = cache_folder(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, root = open_fs(model.path, model.storage_options)
    with _locked(target.with_name(target.name + ".lock"), model.path):
        files = retrying(_listing, fs, root, what=model.path)
        if not files:
            raise ModelFetchError(f"model.path {model.path} holds no files")
        if _complete(target, files):
            log.info("model %s: using the copy in %s (%d files, unchanged upstream)", model.path, target, len(files))
            return target
        started = time.monotonic()
        _remove_leftovers(target)
        temporary = target.with_name(f".tmp-{uuid.uuid4().hex}-{target.name}")
        try:
            temporary.mkdir()
            _download(fs, root, files, temporary, model.path)
            (temporary / FETCHED).write_text(json.dumps({"uri": model.path, "revision": model.revision,
                                                         "files": [f.to_dict() for f in files]}))
            if target.exists():  # an older, now stale copy
                shutil.rmtree(target)
            os.replace(temporary, target)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        size = sum(f.size for f in files)
        log.info("model %s: fetched %d files (%.1f MB) into %s in %.1f s", model.path, len(files), size / 1e6,
                 target, time.monotonic() - started)
        return target


@contextlib.contextmanager
def _locked(path: Path, uri: str) -> Iterator[None]:
    """An exclusive flock on `path`: the node's other processes wait here while one fetches."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model %s: another process on this node is fetching it; waiting for it", uri)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _listing(fs: Any, root: str) -> list[RemoteFile]:
    """Every file under `root` (names relative to it), hidden names skipped, sorted by name."""
    found = []
    fs.invalidate_cache(root)  # fsspec keeps listings per file system instance: a later run must see changes
    for path, info in sorted(fs.find(root, detail=True, withdirs=False).items()):
        name = path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
        if not name or any(part.startswith(".") for part in name.split("/")):
            continue
        etag = info.get("ETag") or info.get("etag")
        found.append(RemoteFile(name, int(info.get("size") or 0), str(etag).strip('"') if etag else None))
    return found


def _complete(target: Path, files: list[RemoteFile]) -> bool:
    """Whether `target` holds exactly this listing, fetched and verified before (sizes checked again here)."""
    try:
        fetched = json.loads((target / FETCHED).read_text())
    except (OSError, ValueError):
        return False
    if fetched.get("files") != [f.to_dict() for f in files]:
        log.info("model folder changed upstream since %s was fetched: fetching it again", target)
        return False
    for remote in files:
        local = target / remote.name
        if not local.is_file() or local.stat().st_size != remote.size:
            log.warning("cached model file %s is missing or has the wrong size: fetching the model again", local)
            return False
    return True


def _remove_leftovers(target: Path) -> None:
    """Temporary folders of fetches that died (the lock is ours, so none is in progress)."""
    for leftover in target.parent.glob(f".tmp-*-{target.name}"):
        shutil.rmtree(leftover, ignore_errors=True)


def _download(fs: Any, root: str, files: list[RemoteFile], into: Path, uri: str) -> None:
    sha256: dict[str, str] = {}  # each file's, computed while it streamed in
    for remote in files:
        local = into / remote.name
        local.parent.mkdir(parents=True, exist_ok=True)
        digest = retrying(_fetch_file, fs, f"{root}/{remote.name}", local, what=f"{uri.rstrip('/')}/{remote.name}")
        if local.stat().st_size != remote.size:
            raise ModelFetchError(f"model file {remote.name}: fetched {local.stat().st_size} bytes, the listing says "
                                  f"{remote.size}")
        remote_md5 = remote.etag.lower() if remote.etag and MD5_ETAG.fullmatch(remote.etag.lower()) else None
        if remote_md5 is not None and not _has_checksum_list(files) and digest["md5"] != remote_md5:
            raise ModelFetchError(f"model file {remote.name}: MD5 {digest['md5']} is not its ETag {remote_md5} (a "
                                  f"corrupt transfer; if this storage's ETags are not MD5s, put a SHA256SUMS file "
                                  f"in the model folder)")
        sha256[remote.name] = digest["sha256"]
    _check_sums(files, into, sha256)


def _fetch_file(fs: Any, path: str, local: Path) -> dict[str, str]:
    """Copy one object to `local` (one streamed GET on S3), then hash it: MD5 for its ETag, SHA-256 for a
    checksum list."""
    fs.get_file(path, str(local))
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(local, "rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def _has_checksum_list(files: list[RemoteFile]) -> bool:
    return any(remote.name in CHECKSUM_LISTS for remote in files)


def _check_sums(files: list[RemoteFile], into: Path, sha256: dict[str, str]) -> None:
    """Each file a checksum list in the folder names must have its SHA-256."""
    for remote in files:
        if remote.name not in CHECKSUM_LISTS:
            continue
        for number, line in enumerate((into / remote.name).read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise ModelFetchError(f"{remote.name} line {number} is not `<sha256>  <file>`")
            expected, name = parts[0].lower(), parts[1].strip().lstrip("*").removeprefix("./")
            local = into / name
            if not local.is_file():
                raise ModelFetchError(f"{remote.name} lists {name}, which the model folder does not hold")
            actual = sha256.get(name)
            if actual != expected:
                raise ModelFetchError(f"model file {name}: SHA-256 {actual} is not the {expected} that "
                                      f"{remote.name} lists (a corrupt transfer or a changed file)")
