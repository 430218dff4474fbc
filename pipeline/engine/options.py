"""What a caption actor says about its engine: which engine it is, and what `model.engine_kwargs` became.

- `engine_id()`: a short, stable name for this caption actor (its Ray actor id), stamped on every batch it
  returns (the `engine` column, which the write stage takes off again, `ENGINE_COLUMN`) so the driver counts
  the engines a run used, and tagged on its metrics.
- `engine_config_values(engine, keys)`: where each `model.engine_kwargs` key landed in the built engine's
  config (`vllm_config.scheduler_config.max_num_batched_tokens`, ...), for the actor's `engine config` log
  line: proof that a knob reached the engine, not only the config file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

ENGINE_COLUMN = "engine"  # on caption batches only: the write stage drops it before the fragments are written


def engine_id() -> str:
    """This caption actor's Ray actor id (its first 16 hex digits, unique in practice), or `pid-N` outside an actor.

    A restarted actor (compute.max_actor_restarts) keeps its id: the count is of caption actors, each one engine
    at a time."""
    try:
        import ray

        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
    except Exception:
        actor = None
    return actor[:16] if actor else f"pid-{os.getpid()}"


def stamp_engine(table: pa.Table, engine: str) -> pa.Table:
    """`table` with the `engine` column naming the actor that captioned it."""
    return table.append_column(pa.field(ENGINE_COLUMN, pa.string()), pa.array([engine] * table.num_rows, pa.string()))


def engine_config_values(engine: Any, keys: Iterable[str]) -> dict[str, str]:
    """`key -> "<value> (<sub-config>)"` for each key found on the engine's `vllm_config` or one of its
    sub-configs (scheduler, cache, model, parallel, ...); keys vLLM keeps elsewhere are left out."""
    config = getattr(engine, "vllm_config", None)
    if config is None:
        return {}
    parts = [("vllm_config", config)] + [(name, value) for name, value in vars(config).items()
                                        if name.endswith("_config") and value is not None]
    found = {}
    for key in keys:
        for name, part in parts:
            if hasattr(part, key):
                found[key] = f"{getattr(part, key)!r} ({name})"
                break
    return found
