"""`model.engine_kwargs`, `model.quantization` and `compute.actors`: checked when the config loads, and fingerprinted
only where they change captions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, build_config, engine_options, load_config
from pipeline.config.engine_options import RESERVED, SPEED_ONLY, known_engine_arguments
from pipeline.engine.actor import engine_kwargs


def tree(model: dict | None = None, compute: dict | None = None) -> dict:
    return {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m", **(model or {})},
            "modes": [{"name": "tags", "type": "booru_like", "max_tokens": 64}], "compute": compute or {}}


def write(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(tree(**sections)))
    return path


def test_a_misspelled_engine_argument_fails_the_load_naming_it_and_its_likely_spelling(tmp_path: Path):
    config = write(tmp_path / "run.yaml", model={"engine_kwargs": {"max_num_batched_tokenz": 4096}})
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    message = str(caught.value)
    assert "model.engine_kwargs.max_num_batched_tokenz: not an engine argument of the installed vLLM" in message
    assert "did you mean 'max_num_batched_tokens'" in message and "\n" not in message


def test_real_engine_arguments_load_and_reach_the_engine_arguments_over_the_pipelines(tmp_path: Path):
    kwargs = {"max_num_batched_tokens": 4096, "kv_cache_dtype": "auto", "compilation_config": {"level": 0}}
    config = load_config(write(tmp_path / "run.yaml", model={"engine_kwargs": kwargs, "quantization": "fp8"}))
    built = engine_kwargs(config.model, seed=0, on_gpu=True)
    assert {key: built[key] for key in kwargs} == kwargs and built["quantization"] == "fp8"
    assert "max_num_batched_tokens" in known_engine_arguments() and "chat_template" in known_engine_arguments()


def test_keys_the_pipeline_sets_are_refused_with_what_to_set_instead():
    for key, instead in (("dtype", "set model.dtype"), ("seed", "run's `seed`"),
                         ("limit_mm_per_prompt", "one image per prompt")):
        with pytest.raises(ConfigError, match=f"model.engine_kwargs: {key}: set by the pipeline; .*{instead}"):
            build_config(tree(model={"engine_kwargs": {key: 1}}))
    pipelines_own = set(engine_kwargs(build_config(tree()).model, seed=0, on_gpu=True))
    assert set(RESERVED) >= pipelines_own - {"enable_chunked_prefill"}


def test_chunked_prefill_stays_off_on_cpu_engines_whatever_the_config_says():
    model = build_config(tree(model={"engine_kwargs": {"enable_chunked_prefill": True}})).model
    assert engine_kwargs(model, seed=0, on_gpu=False)["enable_chunked_prefill"] is False
    assert engine_kwargs(model, seed=0, on_gpu=True)["enable_chunked_prefill"] is True


def test_quantization_is_what_the_installed_vllm_knows(tmp_path: Path):
    methods = engine_options.known_quantization_methods()
    assert "fp8" in methods
    assert load_config(write(tmp_path / "a.yaml", model={"quantization": "fp8"})).model.quantization == "fp8"
    wrong = "bitsandbytes" if "bitsandbytes" not in methods else "no-such-method"
    with pytest.raises(ConfigError, match=f"model.quantization: '{wrong}' is not a quantization method of the "
                                          "installed vLLM"):
        load_config(write(tmp_path / "b.yaml", model={"quantization": wrong}))


def test_without_vllm_here_the_check_is_left_to_the_engine_with_a_note(tmp_path: Path, monkeypatch,
                                                                      caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr(engine_options, "vllm_installed", lambda: False)
    config = load_config(write(tmp_path / "run.yaml", model={"engine_kwargs": {"anything_at_all": 1},
                                                             "quantization": "bitsandbytes"}))
    assert config.model.engine_kwargs == {"anything_at_all": 1}
    assert "vLLM is not installed here" in caplog.text and "checked where the engine starts" in caplog.text


def test_caption_changing_engine_arguments_enter_the_fingerprint_and_speed_knobs_do_not():
    plain = build_config(tree()).fingerprint()
    speed = {"max_num_batched_tokens": 8192, "mm_processor_cache_gb": 0, "enable_chunked_prefill": False,
             "compilation_config": {"level": 3}, "max_num_queued_reqs": 10}
    assert set(speed) <= SPEED_ONLY
    assert build_config(tree(model={"engine_kwargs": speed})).fingerprint() == plain
    assert build_config(tree(model={"max_num_seqs": 8, "enforce_eager": True})).fingerprint() == plain
    for numerics in ({"kv_cache_dtype": "fp8"}, {"hf_overrides": {"rope_theta": 1.0}}, {"tokenizer": "other"}):
        assert build_config(tree(model={"engine_kwargs": numerics})).fingerprint() != plain
    assert build_config(tree(model={"quantization": "fp8"})).fingerprint() != plain
    assert build_config(tree(model={"dtype": "float16"})).fingerprint() != plain
    # Where a model comes from and how it is cached is not what it computes.
    where = {"cache_dir": "/x", "storage_options": {"endpoint_url": "http://e"}}
    assert build_config(tree(model=where)).fingerprint() == plain


@pytest.mark.parametrize("value, canonical, bounds", [
    (3, 3, (3, 3)), ("2", 2, (2, 2)), ("1..4", "1..4", (1, 4)), (" 2 .. 2 ", 2, (2, 2)), ("AUTO", "auto", None),
    (None, None, None)])
def test_actors_take_a_count_a_range_or_auto(value: object, canonical: object, bounds: object):
    compute = build_config(tree(compute={"actors": value})).compute
    assert compute.actors == canonical and compute.actor_bounds() == bounds


@pytest.mark.parametrize("value", [0, "0..2", "3..1", "1-4", "many", True, 1.5])
def test_actors_refuse_anything_else_naming_the_key(value: object):
    with pytest.raises(ConfigError, match=r"compute\.actors: .*(engine count|valid integer|valid string|Input should)"):
        build_config(tree(compute={"actors": value}))


def test_actors_as_a_range_from_the_command_line():
    assert build_config(tree(), ["compute.actors=1..2"]).compute.actor_bounds() == (1, 2)
    assert build_config(tree(), ["compute.actors=auto"]).compute.actors == "auto"
