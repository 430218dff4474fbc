"""The `engine` section of the run config: which engine captions.

- `kind: vllm` (the default): each caption actor runs its own vLLM engine in-process (pipeline/engine/actor.py).
- `kind: openai`: each caption actor is a client of an OpenAI-compatible server, typically `vllm serve` of
  JoyCaption with `--enable-prefix-caching` (pipeline/engine/remote.py). The actor needs no GPU; the
  server or fleet behind `base_url` does the work.

The run's `engines:` section names more OpenAI-compatible servers (`engines: {rewriter: {kind: openai, ...}}`)
that single modes send their requests to (`modes[].engine: rewriter`), e.g. a text LLM rewriting a caption.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.captioning.specs import Strict


class EngineConfig(Strict):
    kind: Literal["vllm", "openai"] = Field(
        "vllm", description="`vllm`: an in-process vLLM engine per caption actor; `openai`: requests to an "
                            "OpenAI-compatible server at `engine.base_url` (e.g. `vllm serve`).")
    base_url: str | None = Field(None, description="kind openai: the server's API root, e.g. "
                                                   "http://10.0.0.5:8000/v1 (required).")
    model: str | None = Field(None, description="kind openai: the served model name; default `model.path`.")
    api_key_env: str | None = Field(None, description="kind openai: environment variable holding the API key "
                                                      "(sent as a bearer token); none sent when unset.")
    max_concurrency: int = Field(64, ge=1, le=100_000, description="kind openai: most requests in flight per "
                                                                   "caption actor; the actual number adapts to "
                                                                   "the server (AIMD) below it.")
    timeout_s: float = Field(300.0, gt=0, description="kind openai: one request's time limit; a request past it "
                                                      "is retried.")
    unreachable_s: float = Field(300.0, gt=0, description="kind openai: how long the server may stay unreachable "
                                                          "(connection errors, 5xx, 429, timeouts, nothing "
                                                          "answered) before the run fails.")
    inline_image_placeholder: bool = Field(
        True, description="kind openai: put the `<image>` placeholder in the user text, right before the "
                          "instruction (as the in-process engine does); vLLM's server then keeps it where it is. "
                          "Set false for servers whose chat template places images itself.")

    @model_validator(mode="after")
    def _needs_a_server(self) -> EngineConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("`engine.base_url` is required with `engine.kind: openai` (e.g. http://host:8000/v1)")
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"`engine.base_url` must start with http:// or https://, got {self.base_url!r}")
        return self


def named_engine_problem(name: str, engine: EngineConfig) -> str | None:
    """Why `engines.NAME` cannot be used, or None: only servers can be named (a second in-process engine per
    actor would need a second model's memory on every GPU)."""
    if engine.kind != "openai":
        return (f"engines.{name}.kind: a named engine is an OpenAI-compatible server (`kind: openai` with "
                "`base_url`); the in-process engine is the run's own `engine`")
    if not engine.model:
        return f"engines.{name}.model: required, the model the server serves (e.g. the name `vllm serve` was given)"
    return None
