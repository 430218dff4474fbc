"""Caption confidence on CPU: what requesting log-probabilities costs, and what the score separates.

    python bench/bench_confidence.py [--images N] [--rounds R] [--tokens T]

On the tiny model (pipeline/testing/tiny_model.py) and the caption actor's own engine settings:
  cost        `vllm.LLM.generate` over N images x 2 modes at a fixed length (every caption exactly T
              tokens, so both arms decode the same work), with `logprobs=0` (the sampled token's own
              log-probability, what the actor asks for) and without; arms alternate for R rounds and the
              best round of each is compared
  separation  the same requests sampled greedily (temperature 0: the model's own most likely text) and at
              temperature 2 (derailing text), scored by captioning/confidence.py: how often a greedy
              caption outranks the hot one of the same image and mode, and the greedy captions the glitch
              detector calls repetition loops against the others (the tiny model's weights are random:
              its absolute scores are near 1/vocabulary and mean nothing, only the ranking does)

`--rounds 0` skips the cost arms.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_throughput import bench_config, make_images  # noqa: E402
from pipeline.captioning.confidence import confidence, sampled_logprobs  # noqa: E402
from pipeline.captioning.images import pixels_to_image, prepare_image  # noqa: E402
from pipeline.captioning.modes import derive_seed  # noqa: E402
from pipeline.captioning.prompts import chat_string  # noqa: E402
from pipeline.captioning.quality import detect_glitch  # noqa: E402
from pipeline.config import build_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="tokens per caption in the cost arms")
    args = parser.parse_args()
    from pipeline.engine.actor import engine_kwargs, prepare_environment
    from pipeline.testing.tiny_model import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-confidence-"))
    model = build_tiny_model(work / "tiny")
    paths = make_images(work / "images", args.images)
    config = build_config(bench_config(model, work / "images", work / "out", False, args.tokens, args.tokens, 16))
    prepare_environment(config.model, False)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(config.model, config.seed, False))
    tokenizer = llm.get_tokenizer()
    images = {p.name: pixels_to_image(prepare_image(p.read_bytes(), p.name).pixels or b"") for p in paths}
    modes = config.resolved_modes()

    def batch(temperature: float | None, logprobs: int | None, fixed: bool) -> tuple[list[Any], list[Any]]:
        prompts, params = [], []
        for key, image in images.items():
            for mode in modes:
                ids = tokenizer.encode(chat_string(config.defaults.system_prompt, mode.instructions[0]),
                                       add_special_tokens=False)
                prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})
                extra = {"min_tokens": args.tokens, "ignore_eos": True} if fixed else {}
                params.append(SamplingParams(max_tokens=args.tokens, top_p=mode.top_p if temperature else 1.0,
                                             temperature=mode.temperature if temperature is None else temperature,
                                             seed=derive_seed(config.seed, key, mode.name), logprobs=logprobs,
                                             **extra))
        return prompts, params

    llm.generate(*batch(None, 0, True), use_tqdm=False)  # warm-up, both paths compiled
    if args.rounds > 0:
        cost(llm, batch, args, len(modes))
    separation(llm, batch, config)
    return 0


def cost(llm: Any, batch: Any, args: argparse.Namespace, modes: int) -> None:
    times: dict[str, list[float]] = {"with logprobs=0": [], "without": []}
    for _ in range(args.rounds):
        for arm, logprobs in (("without", None), ("with logprobs=0", 0)):
            started = time.perf_counter()
            llm.generate(*batch(None, logprobs, True), use_tqdm=False)
            times[arm].append(time.perf_counter() - started)
    best = {arm: min(values) for arm, values in times.items()}
    captions = args.images * modes
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; vllm CPU, tiny "
          f"model; {args.images} images x {modes} modes x {args.tokens} tokens, best of {args.rounds}")
    for arm, seconds in best.items():
        print(f"  {arm:<16} {seconds:7.2f} s  {captions * args.tokens / seconds:8.1f} tokens/s  "
              f"(rounds: {', '.join(f'{s:.2f}' for s in times[arm])})")
    print(f"  cost: {best['with logprobs=0'] / best['without']:.3f}x the time without")


def separation(llm: Any, batch: Any, config: Any) -> None:
    greedy = llm.generate(*batch(0.0, 0, False), use_tqdm=False)
    hot = llm.generate(*batch(2.0, 0, False), use_tqdm=False)

    def scored(outputs: list[Any]) -> list[tuple[Any, str | None]]:
        found = []
        for output in outputs:
            completion = output.outputs[0]
            values = sampled_logprobs(completion.token_ids, completion.logprobs) or []
            found.append((confidence(values),
                          detect_glitch(completion.text.strip(), completion.finish_reason, config.quality)))
        return found

    def describe(rows: list[tuple[Any, str | None]]) -> str:
        kept = [c for c, _ in rows if c is not None]
        if not kept:
            return "none"
        return (f"score mean {statistics.fmean(c.score for c in kept):.3g} (min {min(c.score for c in kept):.3g}, "
                f"max {max(c.score for c in kept):.3g})"
                f"; token logprob mean {statistics.fmean(c.mean for c in kept):.2f}, "
                f"worst window {statistics.fmean(c.window for c in kept):.2f}")

    cold, warm = scored(greedy), scored(hot)
    wins = sum(1 for (a, _), (b, _) in zip(cold, warm, strict=True) if a and b and a.score > b.score)
    print(f"separation over {len(cold)} (image, mode) pairs:")
    print(f"  temperature 0: {describe(cold)}")
    print(f"  temperature 2: {describe(warm)}")
    print(f"  greedy outranks hot in {wins}/{len(cold)} pairs")
    loops = [row for row in cold if row[1] == "repetition"]
    print(f"  greedy repetition loops: {len(loops)}/{len(cold)}: {describe(loops)}; "
          f"the other greedy captions: {describe([row for row in cold if row[1] != 'repetition'])}")


if __name__ == "__main__":
    raise SystemExit(main())
