"""Prompts filled from the data, and the run report, through the real pipeline: an img2dataset WebDataset
folder captioned with `{meta.caption}` records each image's own alt text in its prompt, and the report the
run writes renders in headless Chromium with every chart."""

from __future__ import annotations

import json
import posixpath
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.table.names import DATA
from tests.integration.conftest import run_cli, write_config
from tests.unit.exports.test_report import check_report_in_chromium
from tests.unit.io.test_img2dataset_layouts import IMG2DATASET, STORED, downloaded, served  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not IMG2DATASET.exists(), reason="img2dataset is not installed: make img2dataset"),
              pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium")]
PROMPT = ("Write booru tags for this image. Its alt text: {meta.caption}. Its page: {meta.missing?}. "
          "Folder {folder|none}.")
CHARTS = ["words-tags", "confidence-tags", "glitches", "errors", "throughput-shards", "throughput-images", "tags-tags"]


def test_prompts_carry_each_images_alt_text_and_the_report_renders(tmp_path: Path, tiny_model: Path,
                                                                    downloaded: dict[str, Path]) -> None:  # noqa: F811
    folder = downloaded["webdataset"]
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(folder), str(out), input={"uri": str(folder)},
                          modes=[{"name": "tags", "prompt": PROMPT, "max_tokens": 8}])
    result = run_cli("run", str(config))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"report: {out}/report.html" in result.stdout + result.stderr
    table = pd.read_parquet(out / DATA)
    ok = table[table.status == "ok"]
    assert sorted(ok.key) == sorted(STORED["webdataset"](folder))
    for key, meta, prompt in zip(ok.key, ok.meta, ok.tags_prompt, strict=True):
        alt = json.loads(meta)["caption"]
        folder = posixpath.basename(posixpath.dirname(key)) or "none"  # a tar member's key: <tar>/<sample>
        assert alt.startswith("alt text ")
        assert prompt == f"Write booru tags for this image. Its alt text: {alt}. Folder {folder}.", prompt
    assert ok.tags_prompt.nunique() == len(ok)  # one filled prompt per image

    page = out / "report.html"
    dom = check_report_in_chromium(page, CHARTS, tmp_path / "chromium")
    assert 'data-note="engines"' in dom
