"""img2dataset's three output formats through the real pipeline, with nothing set but the input folder."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.table.names import DATA
from tests.integration.conftest import run_cli, write_config
from tests.unit.io.test_img2dataset_layouts import IMG2DATASET, STORED, downloaded, served  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not IMG2DATASET.exists(), reason="img2dataset is not installed: make img2dataset")]
QUICK_MODES = [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 8}]


# One layout in the quick tier; the other two with the slow tests (`make test-all`).
@pytest.mark.parametrize("output", ["webdataset", pytest.param("parquet", marks=pytest.mark.slow),
                                    pytest.param("files", marks=pytest.mark.slow)])
def test_every_saved_image_is_captioned_once_with_its_alt_text(tmp_path: Path, tiny_model: Path,
                                                               downloaded: dict[str, Path], output: str):  # noqa: F811
    folder = downloaded[output]
    out = tmp_path / "out"
    # The input section holds the folder and nothing else: the layout and the image column are found.
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), input={"uri": str(folder)},
                          modes=QUICK_MODES)
    result = run_cli("run", str(config), "--input", str(folder))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(out / DATA)
    saved = STORED[output](folder)
    ok = table[table.status == "ok"]
    assert sorted(ok.key) == sorted(saved) and table.key.is_unique  # every saved image exactly once
    assert ok.tags.str.len().gt(0).all()
    metas = [json.loads(meta) for meta in ok.meta]
    assert all(meta["caption"].startswith("alt text ") and meta["url"].startswith("http://127.0.0.1:")
               for meta in metas)
    failed = table[table.status == "error"]  # only the parquet format keeps img2dataset's failed rows
    assert len(failed) == (2 if output == "parquet" else 0)
    assert all("404" in error for error in failed.error)
