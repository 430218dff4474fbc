"""Decode + prepare throughput of large JPEGs: draft-mode decoding vs full decoding.

    python bench/bench_decode.py [--images N] [--json OUT]

Makes N (default 24) photographic 4000 x 3000 JPEGs in memory (scikit-image's bundled photographs, upscaled,
with sensor-like grain so they compress like real photos, ~3 MB each at quality 90), then times
`pipeline.captioning.images.prepare_image` on all of them in this one process, with `draft=True` and `draft=False`.
Rounds alternate between the two so background load hits both alike; each rate is the best round.
Images per wall-clock second in one process is images per second per core; images per CPU-second is also
given, being steadier on a busy machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from pipeline.captioning.images import SIZE, prepare_image

WIDTH, HEIGHT = 4000, 3000
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def make_jpegs(count: int, quality: int = 90, seed: int = 0) -> list[bytes]:
    """`count` distinct 4000 x 3000 photographic JPEGs."""
    import skimage.data

    rng = np.random.default_rng(seed)
    bases = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((WIDTH, HEIGHT),
                                                                                  Image.Resampling.BICUBIC)
             for name in PHOTOS[: min(count, len(PHOTOS))]]
    jpegs = []
    for index in range(count):
        pixels = np.asarray(bases[index % len(bases)], dtype=np.int16)
        grain = rng.integers(-12, 13, size=pixels.shape, dtype=np.int16)  # fine detail, as a camera sensor gives
        noisy = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        noisy.save(buffer, "JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    return jpegs


def prepare_all(jpegs: list[bytes], draft: bool) -> tuple[float, float, list[bytes]]:
    """Wall seconds, CPU seconds and the prepared pixels of one pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    outputs = []
    for data in jpegs:
        prepared = prepare_image(data, "photo.jpg", draft=draft)
        if prepared.error is not None or prepared.pixels is None:
            raise RuntimeError(f"prepare_image failed: {prepared.error}")
        if (prepared.width, prepared.height) != (WIDTH, HEIGHT) or len(prepared.pixels) != SIZE * SIZE * 3:
            raise RuntimeError(f"unexpected output for a {prepared.width}x{prepared.height} image")
        outputs.append(prepared.pixels)
    return time.perf_counter() - wall, time.process_time() - cpu, outputs


def run(count: int, rounds: int) -> dict[str, object]:
    started = time.perf_counter()
    jpegs = make_jpegs(count)
    made = time.perf_counter() - started
    for draft in (True, False):  # warm-up: decoder tables, allocator, lazy imports
        prepare_all(jpegs[:2], draft)

    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    pixels: dict[bool, list[bytes]] = {}
    for _ in range(rounds):
        for draft in (True, False):
            wall, cpu, pixels[draft] = prepare_all(jpegs, draft)
            results[draft].append((wall, cpu))

    def summary(draft: bool) -> dict[str, float]:
        wall = min(w for w, _ in results[draft])
        cpu = min(c for _, c in results[draft])
        return {"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3), "images_per_s": round(count / wall, 2),
                "images_per_cpu_s": round(count / cpu, 2), "ms_per_image": round(1000 * wall / count, 1)}

    draft, full = summary(True), summary(False)
    difference = np.mean([np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8)).mean()
                          for a, b in zip(pixels[True], pixels[False], strict=True)])
    return {
        "images": count, "size": [WIDTH, HEIGHT], "rounds": rounds,
        "mean_jpeg_mb": round(sum(map(len, jpegs)) / count / 1e6, 2),
        "draft": draft, "full": full,
        "ratio_draft_over_full": round(draft["images_per_s"] / full["images_per_s"], 2),
        "ratio_draft_over_full_cpu": round(draft["images_per_cpu_s"] / full["images_per_cpu_s"], 2),
        "mean_abs_pixel_difference": round(float(difference), 3),
        "setup_seconds": round(made, 1), "total_seconds": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "pillow": Image.__version__,
                    "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24, help="JPEGs to make and prepare (default 24)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per mode; the best counts (default 2)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be at least 1")

    result = run(args.images, args.rounds)
    draft, full = result["draft"], result["full"]
    assert isinstance(draft, dict) and isinstance(full, dict)
    print(f"{args.images} JPEGs of {WIDTH}x{HEIGHT} (~{result['mean_jpeg_mb']} MB each), one process, "
          f"best of {args.rounds}:")
    for label, numbers in (("draft=True ", draft), ("draft=False", full)):
        print(f"  {label}  {numbers['images_per_s']:7.2f} images/s per core  ({numbers['ms_per_image']} ms/image, "
              f"{numbers['images_per_cpu_s']:.2f} images per CPU-second)")
    print(f"  ratio draft/full: {result['ratio_draft_over_full']}x wall, {result['ratio_draft_over_full_cpu']}x CPU; "
          f"mean |draft - full| pixel difference {result['mean_abs_pixel_difference']} / 255")
    print(f"  load average during the run: {result['machine']['load_average']}")  # type: ignore[index]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
