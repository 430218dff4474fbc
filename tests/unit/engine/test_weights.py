"""A model folder on S3 (moto), fetched once per node into the local cache, verified, and reused."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import build_config
from pipeline.engine.weights import (
    FETCHED,
    ModelFetchError,
    cache_folder,
    check_remote_model,
    fetch_model,
    is_remote,
    local_model_path,
)
from tests.faults import FaultProxy

REPO = Path(__file__).resolve().parents[3]
WAITING = "another process on this node is fetching it; waiting"
FILES = {"config.json": b'{"model_type": "llava"}', "model.safetensors": os.urandom(300_000),
         "tokenizer.json": b'{"version": "1.0"}' * 50, "sub/preprocessor_config.json": b"{}"}


def model_of(uri: str, cache: Path, endpoint: str, **more: object):
    return build_config({"input": {"uri": "in"}, "output": {"uri": "out"},
                         "model": {"path": uri, "cache_dir": str(cache), "storage_options": {"endpoint_url": endpoint},
                                   **more},
                         "modes": [{"name": "tags", "type": "booru_like"}]}).model


def upload(s3_fs, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with s3_fs.open(f"{prefix}/{name}", "wb") as handle:
            handle.write(data)
    s3_fs.invalidate_cache()


def object_gets(proxy: FaultProxy, prefix: str) -> dict[str, int]:
    """GET requests per object under `/prefix/` (listings are GETs of the bucket, not counted)."""
    counts: dict[str, int] = {}
    for method, path in proxy.requests:
        if method == "GET" and path.startswith(f"/{prefix}/"):
            name = path[len(prefix) + 2:]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_only_storage_uris_are_fetched(tmp_path: Path):
    assert is_remote("s3://b/m") and is_remote("gs://b/m") and not is_remote("fancyfeast/llama-joycaption")
    assert not is_remote("/models/m") and not is_remote("file:///models/m")
    model = build_config({"input": {"uri": "i"}, "output": {"uri": "o"}, "model": {"path": "org/name"},
                          "modes": [{"name": "t", "type": "booru_like"}]}).model
    assert local_model_path(model) == "org/name"
    first = model_of("s3://b/m", tmp_path, "http://x")
    assert cache_folder(first) == cache_folder(model_of("s3://b/m/", tmp_path, "http://y"))  # options are not a key
    assert cache_folder(first) != cache_folder(model_of("s3://b/m", tmp_path, "http://x", revision="v2"))
    assert cache_folder(first).parent == tmp_path


def test_two_processes_of_a_node_fetch_once_and_later_runs_reuse_the_copy(tmp_path: Path, s3_server: str, s3_fs,
                                                                         s3_bucket: str):
    upload(s3_fs, f"{s3_bucket}/models/tiny", FILES)
    cache = tmp_path / "cache"
    with FaultProxy(s3_server) as proxy:
        model = model_of(f"s3://{s3_bucket}/models/tiny", cache, proxy.url)
        cache.mkdir()
        lock = cache_folder(model).with_name(cache_folder(model).name + ".lock")
        script = ("import json, logging, sys; logging.basicConfig(level=logging.INFO); "
                  "from pipeline.config import ModelConfig; from pipeline.engine.weights import fetch_model; "
                  "print('FOLDER', fetch_model(ModelConfig.model_validate_json(sys.argv[1])))")
        # Both start while this test holds the node's lock, so both must wait on it: one fetches, one reuses.
        logs_of = [tmp_path / f"worker-{n}.log" for n in range(2)]
        with open(lock, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            workers = [subprocess.Popen([sys.executable, "-c", script, model.model_dump_json()], cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True) for log in logs_of]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and not all(WAITING in log.read_text() for log in logs_of):
                time.sleep(0.2)
            fcntl.flock(held, fcntl.LOCK_UN)
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
        logs = "".join(log.read_text() for log in logs_of)
        assert all(worker.returncode == 0 for worker in workers), logs
        folders = {line.split(" ", 1)[1] for out in outputs for line in out.splitlines() if line.startswith("FOLDER")}
        assert folders == {str(cache_folder(model))}
        assert logs.count(WAITING) == 2
        assert logs.count("fetched 4 files") == 1 and logs.count("using the copy") == 1
        assert object_gets(proxy, f"{s3_bucket}/models/tiny") == {name: 1 for name in FILES}
        for name, data in FILES.items():
            assert (cache_folder(model) / name).read_bytes() == data
        # A later run: a listing, no object read.
        proxy.requests.clear()
        assert fetch_model(model) == cache_folder(model)
        assert object_gets(proxy, f"{s3_bucket}/models/tiny") == {}
        # A file changed upstream: fetched again.
        upload(s3_fs, f"{s3_bucket}/models/tiny", {"tokenizer.json": b'{"version": "2.0"}'})
        assert fetch_model(model) == cache_folder(model)
        assert (cache_folder(model) / "tokenizer.json").read_bytes() == b'{"version": "2.0"}'
        fetched = json.loads((cache_folder(model) / FETCHED).read_text())
        assert {f["name"] for f in fetched["files"]} == set(FILES)
        # A local file damaged since: fetched again.
        (cache_folder(model) / "model.safetensors").write_bytes(b"short")
        proxy.requests.clear()
        fetch_model(model)
        assert object_gets(proxy, f"{s3_bucket}/models/tiny") == {name: 1 for name in FILES}
        assert (cache_folder(model) / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_a_checksum_list_is_checked_and_a_mismatch_fails_naming_the_file(tmp_path: Path, s3_server: str, s3_fs,
                                                                         s3_bucket: str):
    good = "\n".join(f"{hashlib.sha256(data).hexdigest()}  {name}" for name, data in FILES.items())
    upload(s3_fs, f"{s3_bucket}/ok", {**FILES, "SHA256SUMS": good.encode()})
    model = model_of(f"s3://{s3_bucket}/ok", tmp_path, s3_server)
    assert (fetch_model(model) / "model.safetensors").read_bytes() == FILES["model.safetensors"]

    bad = good.replace(hashlib.sha256(FILES["tokenizer.json"]).hexdigest(), "0" * 64)
    upload(s3_fs, f"{s3_bucket}/bad", {**FILES, "SHA256SUMS": bad.encode()})
    model = model_of(f"s3://{s3_bucket}/bad", tmp_path, s3_server)
    with pytest.raises(ModelFetchError, match=r"tokenizer\.json: SHA-256"):
        fetch_model(model)
    assert not cache_folder(model).exists() and not list(tmp_path.glob(".tmp-*"))  # nothing half-made is kept


def test_a_missing_model_folder_is_named_before_the_run(tmp_path: Path, s3_server: str, s3_fs, s3_bucket: str):
    upload(s3_fs, f"{s3_bucket}/m", FILES)
    assert check_remote_model(model_of(f"s3://{s3_bucket}/m", tmp_path, s3_server)) is None
    problem = check_remote_model(model_of(f"s3://{s3_bucket}/nothing", tmp_path, s3_server))
    assert problem and "holds no config.json" in problem
    with pytest.raises(ModelFetchError, match="holds no files"):
        fetch_model(model_of(f"s3://{s3_bucket}/nothing", tmp_path, s3_server))
