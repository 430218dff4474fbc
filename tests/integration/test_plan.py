"""`pipeline plan` on dirty inputs, as a user runs it: exact counts and reasons, and exit 2 for what the user
can fix. Nothing here starts an engine or Ray (one test checks that neither is even imported)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli.main import main
from tests.integration.conftest import REPO, write_config

pytestmark = pytest.mark.integration


def _image(fmt: str, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (120, 80), (shade, 90, 30)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def dirty_folder(tmp_path: Path) -> Path:
    """5 good images, a truncated JPEG, a zero-byte file, a text file named .jpg, and a sidecar (not an image)."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for index in range(3):
        (folder / f"good{index}.jpg").write_bytes(_image("JPEG", index * 50))
    for index in range(2):
        (folder / "sub" / f"good{index}.png").write_bytes(_image("PNG", index * 70))
    whole = _image("JPEG", 200)
    (folder / "sub" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html>404 not found</html>\n")
    (folder / "good0.json").write_text('{"caption": "meta, not an image"}')
    return folder


@pytest.fixture
def damaged_tars(tmp_path: Path) -> Path:
    """Two tars of 3 samples; the second is cut inside its last sample's image."""
    folder = tmp_path / "tars"
    folder.mkdir()
    for name, cut in (("000000.tar", False), ("000001.tar", True)):
        buffer, images = io.BytesIO(), [_image("JPEG", index * 60) for index in range(3)]
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for index, data in enumerate(images):
                info = tarfile.TarInfo(f"s{index}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        data = buffer.getvalue()
        (folder / name).write_bytes(data[: data.index(images[2]) + 100] if cut else data)
    return folder


def _plan(tmp_path: Path, input_uri: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    model = tmp_path / "model"  # plan never loads the model, but validate_before_start wants the folder
    model.mkdir(exist_ok=True)
    config = write_config(tmp_path / "run.yaml", model, str(input_uri), str(tmp_path / "out"),
                          input={"uri": str(input_uri), "shard_size": 3})
    code = main(["plan", str(config), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_dirty_folder_is_counted_exactly_with_reasons(tmp_path: Path, dirty_folder: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    code, out, _err = _plan(tmp_path, dirty_folder, "--json", capsys=capsys)
    assert code == 0
    plan = json.loads(out)
    assert (plan["images"], plan["shards"], plan["broken"]) == (8, 3, 3)  # 8 images in shards of 3
    assert plan["read"]["everything"] and not plan["images_estimated"]
    assert plan["read"]["reasons"] == {"truncated or corrupt image": 1, "empty file": 1, "not an image": 1}
    examples = {kind: items[0]["key"] for kind, items in plan["read"]["examples"].items()}
    assert examples == {"truncated or corrupt image": "sub/cut.jpg", "empty file": "zero.jpg",
                        "not an image": "page.jpg"}
    images = [path for path in dirty_folder.rglob("*") if path.suffix in (".jpg", ".png")]
    assert plan["bytes"] == sum(path.stat().st_size for path in images)  # the sidecar is not counted
    assert plan["read"]["formats"] == {"JPEG": 3, "PNG": 2}
    assert plan["estimate"]["images"] == 5 and plan["estimate"]["modes"] == 2  # broken files cost no GPU time


def test_the_table_and_a_sample(tmp_path: Path, dirty_folder: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _err = _plan(tmp_path, dirty_folder, capsys=capsys)
    assert code == 0
    assert "images      8 in 3 shards (shard size 3)" in out
    assert "read        all 8 images" in out and "3 broken (37.50%)" in out
    assert "e.g. sub/cut.jpg: truncated or corrupt image" in out and "(an estimate)" in out
    code, out, _err = _plan(tmp_path, dirty_folder, "--sample", "4", "--json", capsys=capsys)
    plan = json.loads(out)
    assert code == 0 and plan["read"]["images"] == 4 and not plan["read"]["everything"] and plan["broken_estimated"]
    assert plan["images"] == 8 and plan["broken"] == round(8 * plan["read"]["broken"] / 4)
    assert plan["broken_range"][0] <= plan["broken"] <= plan["broken_range"][1] <= 8
    again = json.loads(_plan(tmp_path, dirty_folder, "--sample", "4", "--json", capsys=capsys)[1])
    assert again["read"]["examples"] == plan["read"]["examples"]  # the same sample every time


def test_a_tar_with_a_damaged_member(tmp_path: Path, damaged_tars: Path, capsys: pytest.CaptureFixture[str]):
    code, out, _err = _plan(tmp_path, damaged_tars, "--sample", "all", "--json", capsys=capsys)
    assert code == 0
    plan = json.loads(out)
    # 3 + 2 good samples; the cut sample and the unreadable rest of its tar are the run's two error rows.
    assert (plan["format"], plan["shards"], plan["images"], plan["broken"]) == ("webdataset", 2, 7, 2)
    assert plan["read"]["reasons"] == {"sample cut short": 1, "tar damaged after byte N": 1}
    assert plan["read"]["examples"]["sample cut short"][0]["key"] == "000001/s2"


def test_a_bad_key_and_a_missing_input_exit_2_in_one_line(tmp_path: Path, dirty_folder: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    code, out, err = _plan(tmp_path, dirty_folder, "--set", "input.shard_sise=5", capsys=capsys)
    assert (code, out) == (2, "") and err.strip() == "error: invalid config: input.shard_sise: unknown key"
    code, out, err = _plan(tmp_path, dirty_folder, "--input", str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == f"error: input.uri does not exist: {tmp_path / 'nowhere'}"
    code, _out, err = _plan(tmp_path, dirty_folder, "--set", f"model.path={tmp_path / 'no-model'}", capsys=capsys)
    assert code == 2 and "model.path does not exist" in err


def test_plan_imports_neither_ray_nor_vllm(tmp_path: Path, dirty_folder: Path):
    model = tmp_path / "model"
    model.mkdir()
    config = write_config(tmp_path / "run.yaml", model, str(dirty_folder), str(tmp_path / "out"))
    script = ("import sys; from pipeline.cli.main import main; code = main(['plan', sys.argv[1], '--json']); "
              "heavy = sorted({'ray', 'vllm', 'torch'} & set(sys.modules)); print(heavy, file=sys.stderr); "
              "sys.exit(code or (3 if heavy else 0))")
    result = subprocess.run([sys.executable, "-c", script, str(config)], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["images"] == 8 and "[]" in result.stderr
    assert not (tmp_path / "out").exists()  # planning writes nothing to the output
