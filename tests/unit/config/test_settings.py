"""Config loading: strict keys, overrides, errors that name the key, fingerprints."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, build_config, load_config

REPO = Path(__file__).resolve().parents[3]


def base(**changes: object) -> dict:
    tree = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"},
            "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": 128},
                      {"name": "description", "type": "straightforward", "length": 160, "max_tokens": 256}]}
    tree.update(changes)
    return tree


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    config = load_config(path)
    assert config.modes


def test_overrides_reach_list_items_and_parse_values():
    config = build_config(base(), ["modes.0.length=80", "modes.1.extra=[lighting, camera_angle]", "seed=7",
                                   "compute.batch_size=4"])
    assert config.modes[0].length == 80
    assert config.modes[1].extra == ("lighting", "camera_angle")
    assert config.seed == 7 and config.compute.batch_size == 4


@pytest.mark.parametrize("override, message", [
    ("modes.5.length=80", "no list item modes.5"),
    ("nonsense", "key=value"),
])
def test_bad_overrides_are_explained(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        build_config(base(), [override])


@pytest.mark.parametrize("tree, where, what", [
    (base(bogus=1), "bogus", "unknown key"),
    (base(input={"uri": "x", "shardsize": 3}), "input.shardsize", "unknown key"),
    (base(modes=[{"name": "tags", "type": "haiku"}]), "modes.0", "unknown caption type 'haiku'"),
    (base(modes=[{"name": "tags", "type": "booru_like", "length": 5000}]), "modes.0", "mode 'tags'.*5000"),
    (base(modes=[{"name": "tags", "type": "booru_like", "length": "huge"}]), "modes.0", "mode 'tags'.*huge"),
    (base(modes=[{"name": "tags", "type": "booru_like", "extra": ["glitter"]}]), "modes.0", "'glitter'"),
    (base(modes=[{"name": "tags", "type": "booru_like", "prompt": "x"}]), "modes.0", "exactly one of"),
    (base(modes=[{"name": "Bad Name", "type": "booru_like"}]), "modes.0.name", "lower_snake_case"),
    (base(modes=[{"name": "key", "type": "booru_like"}]), "modes.0.name", "lower_snake_case"),
    (base(modes=[{"name": "a", "type": "booru_like"}, {"name": "a", "type": "midjourney"}]), "modes", "unique"),
    (base(modes=[]), "modes", "at least one"),
    (base(modes="triple"), "modes", "unknown mode preset 'triple'"),
    (base(defaults={"temperature": 9}), "defaults.temperature", "less than or equal"),
])
def test_errors_name_the_offending_key(tree: dict, where: str, what: str):
    with pytest.raises(ConfigError, match=rf"(?s){where}.*{what}"):
        build_config(tree)


def test_dual_preset_reproduces_the_seed_script():
    config = build_config(base(modes="dual"))
    assert [(m.name, m.type, m.length, m.max_tokens) for m in config.modes] == [
        ("tags", "booru_like", 50, 128), ("description", "straightforward", 160, 256)]
    assert build_config(base(modes=[{"preset": "dual", "temperature": 0.3}])).modes[1].temperature == 0.3


def test_fingerprint_tracks_what_changes_rows_only():
    fingerprint = build_config(base()).fingerprint()
    assert build_config(base(), ["output.uri=elsewhere", "compute.actors=8"]).fingerprint() == fingerprint
    assert build_config(base(), ["input.storage_options={endpoint_url: x}"]).fingerprint() == fingerprint
    for change in ["modes.0.length=60", "seed=1", "model.path=other", "defaults.system_prompt=hi",
                   "modes.1.temperature=0.1", "input.shard_size=3"]:
        assert build_config(base(), [change]).fingerprint() != fingerprint, change


def test_load_config_fails_fast_on_missing_file_and_bad_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    caller, sleep = threading.current_thread(), time.sleep

    def no_waiting(seconds: float) -> None:  # fast means no retry backoff: a config error is final
        assert threading.current_thread() is not caller, f"load_config waited {seconds} s before failing"
        sleep(seconds)

    monkeypatch.setattr(time, "sleep", no_waiting)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_cli_flags_override_input_and_output(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base()))
    config = load_config(path, input_uri="s3://bucket/images", output_uri="/data/out dir")
    assert config.input.uri == "s3://bucket/images" and config.output.uri == "/data/out dir"


@pytest.mark.parametrize("names, says", [
    (["tags", "tags_raw"], "mode 'tags_raw' would write column 'tags_raw', which is already a column of mode 'tags'"),
    (["x_prompt", "x"], "mode 'x' would write column 'x_prompt', which is already a column of mode 'x_prompt'"),
    (["shard"], "not one of"),
    (["pixels"], "not one of"),
])
def test_modes_whose_columns_collide_are_refused_naming_both(names: list[str], says: str):
    modes = [{"name": name, "type": "booru_like", "length": 50} for name in names]
    with pytest.raises(ConfigError, match="modes") as caught:
        build_config(base(modes=modes))
    assert says in str(caught.value)
