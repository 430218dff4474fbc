"""A model folder on S3: the run fetches it once into the node's cache and captions exactly as from the local path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pipeline.io.fs import open_fs
from pipeline.table.names import DATA
from tests.faults import FaultProxy
from tests.integration.conftest import run_cli, write_config

pytestmark = pytest.mark.integration


def _object_gets(proxy: FaultProxy, prefix: str) -> dict[str, int]:
    """GET requests per object under `/prefix/` (a listing is a GET of the bucket, not counted)."""
    gets: dict[str, int] = {}
    for method, path in proxy.requests:
        if method == "GET" and path.startswith(f"/{prefix}/"):
            name = path.removeprefix(f"/{prefix}/")
            gets[name] = gets.get(name, 0) + 1
    return gets


def test_a_model_on_s3_is_fetched_once_and_captions_as_the_local_folder(tmp_path: Path, tiny_model: Path,
                                                                       samples: Path, s3_server: str, s3_fs,
                                                                       s3_bucket: str):
    files = sorted(path.relative_to(tiny_model).as_posix() for path in tiny_model.rglob("*") if path.is_file()
                   and not any(part.startswith(".") for part in path.relative_to(tiny_model).parts))
    for name in files:
        s3_fs.put_file(str(tiny_model / name), f"{s3_bucket}/models/tiny/{name}")
    # One image per batch: each engine sees the same requests together, so the captions can be compared.
    modes = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 24},
             {"name": "description", "type": "straightforward", "length": 160, "max_tokens": 24}]
    common = {"modes": modes, "compute": {"batch_size": 1}}
    model = {"dtype": "float32", "max_model_len": 2048, "kv_cache_space_gb": 1}
    cache = tmp_path / "cache"
    with FaultProxy(s3_server) as proxy:  # counts the requests the run sends to storage
        # What one download of each file costs (s3fs reads a big file in concurrent ranged parts), through the
        # pipeline's own file system code.
        fs, _ = open_fs(f"s3://{s3_bucket}/models/tiny", {"endpoint_url": proxy.url})
        for name in files:
            fs.get_file(f"{s3_bucket}/models/tiny/{name}", str(tmp_path / "one-download"))
        once = _object_gets(proxy, f"{s3_bucket}/models/tiny")
        proxy.requests.clear()
        fetched = write_config(tmp_path / "s3.yaml", tiny_model, str(samples), str(tmp_path / "from-s3"), **common,
                               model={"path": f"s3://{s3_bucket}/models/tiny", "cache_dir": str(cache),
                                      "storage_options": {"endpoint_url": proxy.url}, **model})
        result = run_cli("run", str(fetched), timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        gets = _object_gets(proxy, f"{s3_bucket}/models/tiny")
    assert set(once) == set(files) and gets == once  # every file fetched, each exactly once
    [folder] = [path for path in cache.iterdir() if path.is_dir()]
    assert sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
                  and not path.name.startswith(".")) == files
    local = write_config(tmp_path / "local.yaml", tiny_model, str(samples), str(tmp_path / "local"), **common,
                         model={"path": str(tiny_model), **model})
    result = run_cli("run", str(local), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    columns = ["key", "tags", "description", "tags_seed", "description_seed"]
    remote = pd.read_parquet(tmp_path / "from-s3" / DATA)[columns].sort_values("key").reset_index(drop=True)
    same = pd.read_parquet(tmp_path / "local" / DATA)[columns].sort_values("key").reset_index(drop=True)
    assert len(remote) == len(same) > 0 and remote["tags"].str.len().gt(0).all()
    pd.testing.assert_frame_equal(remote, same)  # same seed, same weights: the same captions
