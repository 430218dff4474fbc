"""Engine time saved by captioning duplicates once: a dataset with a known share of byte-identical copies.

    python bench/bench_dedup.py [--images 600] [--duplicate-share 0.33] [--engine-ms 20] [--json OUT]

Runs the whole pipeline twice on the same folder (real Ray Data, read stage hashing, the run's content index
as its Ray actor, write stage, commits): `compute.dedup: false`, the baseline, then `true`. The caption actor
is a stand-in, not vLLM (a real CPU engine takes seconds an image; the saving is the same per image): it goes
through the very same IndexClient as CaptionActor (pipeline.engine.dedup) and spends `--engine-ms` per image it
sends to its "engine". Reports the engine seconds of each arm, their ratio (the ideal is 1 - duplicate share),
images sent to the engine, and the wall time of each run.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))



class SleepingCaptioner:
    """Stands in for CaptionActor: `engine_ms` (from the mode's max_tokens, see run_once) per image it captions,
    through the run's content index exactly as CaptionActor does."""

    def __init__(self, config_json: str) -> None:
        from pipeline.config import RunConfig
        from pipeline.engine.dedup import IndexClient
        from pipeline.table.schema import in_flight_schema

        config = RunConfig.model_validate_json(config_json)
        self.modes = [mode.name for mode in config.modes]
        self.engine_s = config.modes[0].max_tokens / 1000  # the bench passes engine milliseconds here
        self.schema = in_flight_schema(self.modes)
        self.dedup = IndexClient.connect(config.output.uri, config.compute.dedup_wait_s) \
            if config.compute.dedup else None

    def _engine(self, keys: list[str]) -> list[Any]:
        time.sleep(self.engine_s * len(keys))
        return [f"a photograph ({key})" for key in keys]

    def __call__(self, batch: Any) -> Any:
        from pipeline.table.schema import to_table

        columns = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "pixels"}
        ok = [i for i, status in enumerate(columns["status"]) if status == "ok"]
        keys = [columns["key"][i] for i in ok]
        hashes = columns.get("content_hash") or [None] * len(columns["key"])
        if self.dedup is None:
            captions, copied = self._engine(keys), [None] * len(ok)
        else:
            captions, copied = self.dedup.caption(lambda at: self._engine([keys[j] for j in at]), keys,
                                                  [columns["shard"][i] for i in ok], [hashes[i] for i in ok],
                                                  final=lambda caption: caption is not None)
        columns["duplicate_of"] = [None] * len(columns["key"])
        for mode in self.modes:
            columns[mode] = [None] * len(columns["key"])
        for position, i in enumerate(ok):
            columns["duplicate_of"][i] = copied[position]
            for mode in self.modes:
                columns[mode][i] = captions[position]
        return to_table(columns, self.schema)


def _images(folder: Path, count: int, share: float) -> int:
    """`count` files, `share` of them byte-identical copies of others; returns the distinct count."""
    import numpy as np
    from PIL import Image

    distinct = count - round(count * share)
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(distinct):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=80)
        blobs.append(buffer.getvalue())
    for index in range(count):
        path = folder / f"{index // 1000:03d}" / f"{index:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blobs[index if index < distinct else int(rng.integers(0, distinct))])
    return distinct


def run_once(input_uri: str, output_uri: str, dedup: bool, engine_ms: int) -> dict[str, Any]:
    from pipeline.config import build_config
    from pipeline.run.driver import execute

    config = build_config({
        "input": {"uri": input_uri, "shard_size": 64}, "output": {"uri": output_uri},
        "model": {"path": "unused-by-the-stand-in"},
        "modes": [{"name": "tags", "type": "booru_like", "length": 50, "max_tokens": engine_ms}],
        "compute": {"actors": 1, "cpus_per_actor": 0.5, "batch_size": 32, "dedup": dedup}})
    started = time.perf_counter()
    summary = execute(config, overwrite=True, allow_existing=True, captioner=SleepingCaptioner)
    seconds = time.perf_counter() - started
    sent = summary.duplicates.get("captioned", summary.images) if dedup else summary.images
    return {"dedup": dedup, "images": summary.images, "sent_to_engine": sent,
            "reused": summary.duplicates.get("reused", 0), "engine_s": round(sent * engine_ms / 1000, 2),
            "wall_s": round(seconds, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--duplicate-share", type=float, default=1 / 3)
    parser.add_argument("--engine-ms", type=int, default=20, help="stand-in engine time per image")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        distinct = _images(folder, args.images, args.duplicate_share)
        off = run_once(str(folder), str(Path(tmp) / "off"), False, args.engine_ms)
        on = run_once(str(folder), str(Path(tmp) / "on"), True, args.engine_ms)
    result = {"images": args.images, "distinct": distinct, "duplicate_share": round(1 - distinct / args.images, 4),
              "engine": "stand-in (sleeps --engine-ms per image), not vLLM", "off": off, "on": on,
              "engine_time_ratio": round(on["engine_s"] / off["engine_s"], 4) if off["engine_s"] else None,
              "ideal_ratio": round(distinct / args.images, 4)}
    print(f"{args.images} images, {distinct} distinct ({result['duplicate_share']:.1%} duplicates), stand-in engine "
          f"{args.engine_ms} ms an image")
    for arm in (off, on):
        print(f"  dedup {'on ' if arm['dedup'] else 'off'}: {arm['sent_to_engine']} images to the engine "
              f"({arm['engine_s']} s), {arm['reused']} reused, wall {arm['wall_s']} s")
    print(f"  engine time ratio on/off {result['engine_time_ratio']} (ideal {result['ideal_ratio']})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
