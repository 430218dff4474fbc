"""How the caption actor configures vLLM, per device, without starting an engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

from pipeline.config import build_config
from pipeline.engine.actor import cpu_engine_threads, engine_kwargs


def model_config(**model: object):
    return build_config({"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m", **model},
                         "modes": [{"name": "tags", "type": "booru_like", "max_tokens": 64}]}).model


def test_cpu_engine_is_eager_without_chunked_prefill_and_gpu_engine_gets_its_memory_share():
    model = model_config(gpu_memory_utilization=0.8, quantization="fp8", max_num_seqs=64)
    cpu, gpu = engine_kwargs(model, seed=3, on_gpu=False), engine_kwargs(model, seed=3, on_gpu=True)
    assert cpu["enforce_eager"] and cpu["enable_chunked_prefill"] is False
    assert "gpu_memory_utilization" not in cpu
    assert gpu["gpu_memory_utilization"] == 0.8 and not gpu["enforce_eager"]
    assert "enable_chunked_prefill" not in gpu
    for kwargs in (cpu, gpu):
        assert kwargs["quantization"] == "fp8" and kwargs["max_num_seqs"] == 64 and kwargs["seed"] == 3
        assert kwargs["limit_mm_per_prompt"] == {"image": 1} and kwargs["enable_prefix_caching"]


def test_cpu_threads_default_to_every_core_this_process_may_use():
    assert cpu_engine_threads(model_config()) == len(os.sched_getaffinity(0))
    assert cpu_engine_threads(model_config(cpu_threads=3)) == 3


def test_cpu_environment_runs_the_engine_in_process_on_the_configured_threads():
    # In a child process: the settings change process-wide state (environment, torch threads).
    code = ("import json, os, torch; from pipeline.config import build_config; "
            "from pipeline.engine.actor import prepare_environment; "
            "m = build_config({'input': {'uri': 'i'}, 'output': {'uri': 'o'}, "
            "'model': {'path': 'm', 'cpu_threads': 3, 'kv_cache_space_gb': 2}, "
            "'modes': [{'name': 't', 'type': 'booru_like'}]}).model; "
            "prepare_environment(m, on_gpu=False); "
            "print(json.dumps([os.environ.get(k) for k in ('VLLM_ENABLE_V1_MULTIPROCESSING', "
            "'VLLM_CPU_KVCACHE_SPACE')] + [torch.get_num_threads()]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == ["0", "2", 3]


class _Proxy:
    """Like Flask's `current_app` outside an app context: any attribute access raises RuntimeError."""

    def __getattribute__(self, name: str) -> object:
        raise RuntimeError("Working outside of application context.")


def test_a_global_that_vllm_cannot_inspect_sends_the_cpu_engine_to_its_own_process(monkeypatch):
    import types

    from pipeline.engine.actor import module_blocking_in_process_engine

    clean = types.ModuleType("plain")
    clean.value = 3  # type: ignore[attr-defined]
    proxied = types.ModuleType("app_with_proxy")
    proxied.current_app = _Proxy()  # type: ignore[attr-defined]
    # Only what the scan reads is replaced; nothing is imported while it is.
    # (warnings.catch_warnings looks itself up in sys.modules)
    monkeypatch.setattr(sys, "modules", {"plain": clean, "json": json, "warnings": warnings})
    assert module_blocking_in_process_engine() is None
    monkeypatch.setattr(sys, "modules", {"plain": clean, "app_with_proxy": proxied, "warnings": warnings})
    assert module_blocking_in_process_engine() == "app_with_proxy"


def test_a_new_gpu_actor_waits_for_the_device_to_free_then_starts():
    from pipeline.engine.actor import wait_for_device_memory

    def device(*readings: float | None, most: int):
        """A free share that reads `readings` in turn, then the last one; more than `most` reads fail."""
        read: list[float | None] = []

        def free_share() -> float | None:
            assert len(read) < most, f"read the free memory {len(read) + 1} times: it should have stopped waiting"
            read.append(readings[min(len(read), len(readings) - 1)])
            return read[-1]

        return free_share, read

    free_share, read = device(0.05, 0.3, 0.95, most=3)
    wait_for_device_memory(0.9, timeout_s=30, free_share=free_share, poll_s=0.01)
    assert read == [0.05, 0.3, 0.95]  # waited while too little was free, started once enough was
    free_share, read = device(0.1, most=1000)
    wait_for_device_memory(0.9, timeout_s=0.05, free_share=free_share, poll_s=0.01)  # gives up, engine decides
    free_share, read = device(None, most=1)
    wait_for_device_memory(0.9, timeout_s=30, free_share=free_share)  # unreadable: no wait
    assert read == [None]


def test_requests_in_flight_come_from_the_config_else_the_engines_batch_limit():
    from types import SimpleNamespace

    from pipeline.engine.actor import requests_in_flight_target
    from pipeline.run.driver import batches_in_flight

    tree = {"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"}, "modes": "dual"}
    engine = SimpleNamespace(vllm_config=SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=512)))
    assert requests_in_flight_target(build_config(tree), engine) == 512
    assert requests_in_flight_target(build_config(tree, ["compute.requests_in_flight=96"]), engine) == 96
    # Ray Data hands a GPU actor enough batches to fill the target, plus one; a CPU actor one batch.
    assert batches_in_flight(build_config(tree), gpus_per_actor=1) == 1024 // 64 + 1
    assert batches_in_flight(build_config(tree, ["model.max_num_seqs=100"]), gpus_per_actor=1) == 3
    assert batches_in_flight(build_config(tree), gpus_per_actor=0) == 1


# ------------------------------------------------------------------------------------------- chained modes
class _EchoLoop:
    """An engine loop that answers at once: an image request with `<mode> of <key>`, a text-only request with
    `short: <its instruction>`; the instruction `refuse me` is refused, as an engine refuses a prompt alone."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.failure = None

    def submit(self, prompts, params):
        from concurrent.futures import Future
        from types import SimpleNamespace

        futures = []
        for prompt in prompts:
            self.requests.append(prompt)
            future: Future = Future()
            if "refuse me" in prompt["instruction"]:
                future.set_exception(ValueError("prompt too long"))
            else:
                text = (f"{prompt['mode']} of {prompt['key']}" if prompt["image"] else
                        f"short: {prompt['instruction']}")
                future.set_result(SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[1, 2],
                                                                             finish_reason="stop", logprobs=None)]))
            futures.append(future)
        return futures

    def stalled_for(self) -> float:
        return 0.0


def _chained_actor(modes: list[dict]):
    from pipeline.engine.actor import CaptionActor
    from pipeline.engine.admission import AdmissionGate, AdmissionStats

    class Actor(CaptionActor):
        def request(self, key, image, mode, attempt=0, instruction=None):
            return {"key": key, "mode": mode.name, "image": mode.image, "instruction": instruction}, None

    actor = Actor.__new__(Actor)
    actor.config = build_config({"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"},
                                 "modes": modes, "quality": {"confidence": False}})
    actor.modes = actor.config.resolved_modes()
    actor.loop, actor.gate, actor.admission_stats = _EchoLoop(), AdmissionGate(64), AdmissionStats()
    return actor


CHAIN = [{"name": "short", "prompt": "Rewrite: {description}", "requires": ["description"], "image": False},
         {"name": "tags", "type": "booru_like"},
         {"name": "description", "prompt": "Describe it; tags: {tags}. {meta.caption?}", "requires": ["tags"]}]


def test_chained_modes_run_stage_by_stage_with_the_earlier_captions_in_their_prompts():
    from pipeline.engine.actor import Generation

    actor = _chained_actor(CHAIN)
    actor._metas = {"b.jpg": '{"caption": "Alt text."}'}
    result = actor.caption(["a.jpg", "b.jpg"], ["image a", "image b"])
    order = [(request["key"], request["mode"]) for request in actor.loop.requests]
    assert [mode for _, mode in order] == ["tags", "tags", "description", "description", "short", "short"]
    by_mode = {mode.name: m for m, mode in enumerate(actor.modes)}
    a_description = result[0][by_mode["description"]]
    assert isinstance(a_description, Generation)
    assert a_description.prompt == "Describe it; tags: tags of a.jpg."
    assert result[1][by_mode["description"]].prompt == "Describe it; tags: tags of b.jpg. Alt text."
    assert result[0][by_mode["short"]].prompt == "Rewrite: description of a.jpg"
    assert result[0][by_mode["short"]].text == "short: Rewrite: description of a.jpg"
    assert [request["image"] for request in actor.loop.requests if request["mode"] == "short"] == [False, False]


def test_an_image_refused_in_one_stage_is_not_asked_again_and_keeps_its_reason():
    from pipeline.engine.actor import Refused

    actor = _chained_actor([{"name": "tags", "prompt": "List tags. {meta.extra?}"}, *CHAIN[::2]])
    actor._metas = {"bad.jpg": '{"extra": "refuse me"}'}
    result = actor.caption(["ok.jpg", "bad.jpg"], ["image", "image"])
    asked = [(request["key"], request["mode"]) for request in actor.loop.requests]
    assert ("bad.jpg", "description") not in asked and ("ok.jpg", "short") in asked
    assert all(isinstance(g, Refused) and "prompt too long" in g.reason for g in result[1])


def test_a_text_only_mode_sends_no_image_to_the_in_process_engine():
    from vllm import SamplingParams

    from pipeline.engine.actor import CaptionActor

    actor = CaptionActor.__new__(CaptionActor)
    actor.config = build_config({"input": {"uri": "in"}, "output": {"uri": "out"}, "model": {"path": "m"},
                                 "modes": CHAIN})
    actor.modes, actor._sampling_params = actor.config.resolved_modes(), SamplingParams
    actor.tokenizer = type("Tokenizer", (), {"encode": lambda self, text, add_special_tokens: [len(text)]})()
    actor._prompt_ids, actor._tokenizer_lock = {}, __import__("threading").Lock()
    by_name = {mode.name: mode for mode in actor.modes}
    text_only, _ = actor.request("a.jpg", "pixels", by_name["short"], instruction="Rewrite: x")
    with_image, _ = actor.request("a.jpg", "pixels", by_name["description"], instruction="Rewrite: x")
    assert "multi_modal_data" not in text_only and with_image["multi_modal_data"] == {"image": "pixels"}
    assert text_only["prompt_token_ids"][0] == with_image["prompt_token_ids"][0] - len("<image>")
