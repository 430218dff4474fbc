"""pipeline.config.uris: one canonical spelling per input or output, and outputs kept out of their inputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import main
from pipeline.config import build_config, load_config
from pipeline.config.uris import canonical_uri, overlap


def test_local_spellings_of_one_folder_are_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = tmp_path / "data" / "in"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "data"))
    spellings = [str(real), f"{real}/", f"file://{real}", f"file://localhost{real}/", "./data/in", "link",
                 "~/in", "file://~/in"]
    assert {canonical_uri(spelling) for spelling in spellings} == {str(real)}


def test_object_store_spellings():
    assert canonical_uri("s3a://bucket/prefix/") == "s3://bucket/prefix"
    assert canonical_uri("S3://bucket/prefix") == "s3://bucket/prefix"
    assert canonical_uri("s3://bucket") == "s3://bucket"
    with pytest.raises(ValueError, match="file:///path"):
        canonical_uri("file://otherhost/data")


def test_config_uris_are_canonical_and_the_fingerprint_follows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    monkeypatch.setenv("HOME", str(tmp_path))
    tree = {"input": {"uri": "~/alias/"}, "output": {"uri": "~/captions"}, "model": {"path": "m"},
            "modes": [{"name": "tags", "type": "booru_like", "length": 50}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    config = load_config(tmp_path / "run.yaml")
    assert config.input.uri == str(tmp_path / "in") and config.output.uri == str(tmp_path / "captions")
    prints = {load_config(tmp_path / "run.yaml", input_uri=spelling).fingerprint()
              for spelling in (str(tmp_path / "in"), f"file://{tmp_path}/in", f"{tmp_path}/alias")}
    assert prints == {config.fingerprint()}
    # The fingerprint is canonical even for a config that was never made absolute.
    assert build_config({**tree, "input": {"uri": f"file://{tmp_path}/alias"}}).fingerprint() == config.fingerprint()


@pytest.mark.parametrize("input_rel, output_rel, says", [
    ("in", "in", "is the input itself"),
    ("in", "in/captions", "is inside input.uri"),
    ("out/in", "out", "is inside output.uri"),
])
def test_overlap(tmp_path: Path, input_rel: str, output_rel: str, says: str):
    assert says in (overlap(str(tmp_path / input_rel), str(tmp_path / output_rel)) or "")


def test_apart_and_prefix_lookalikes_do_not_overlap(tmp_path: Path):
    assert overlap(str(tmp_path / "in"), str(tmp_path / "in-captions")) is None
    assert overlap("s3://b/in", "s3://b/in-captions") is None
    assert overlap("s3://b/in", "s3://b/in/captions") is not None
    assert overlap(str(tmp_path / "in"), "s3://b/in") is None


def test_run_refuses_an_output_inside_its_input_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jpg").write_bytes(b"\xff\xd8")
    (tmp_path / "model").mkdir()
    tree = {"input": {"uri": str(tmp_path / "in")}, "output": {"uri": str(tmp_path / "in" / "captions")},
            "model": {"path": str(tmp_path / "model")}, "modes": [{"name": "tags", "type": "booru_like"}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert main(["run", str(tmp_path / "run.yaml")]) == 2
    assert "is inside input.uri" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "in")) == ["a.jpg"]
