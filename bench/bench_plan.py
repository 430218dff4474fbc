"""Driver memory while planning a million images: it must stay flat as the dataset grows.

    python bench/bench_plan.py [--keys 1000000] [--json OUT]

Writes a file list of N synthetic image URIs, then plans it exactly as a run does (streamed listing with
de-duplication, shards of 256, one plan file per shard written in parallel) and lists the pending shard ids
the Ray dataset is built from. Then it marks every shard done, appends N/10 new URIs, and plans again as a
re-run of a finished output does: re-list, diff against the stored plan, plan the new URIs into new shards.
Reports the driver's peak resident memory (ru_maxrss) and the times, for N/10 and N keys, so the growth is
visible as a ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def plan_only(listing: str, output: str) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from pipeline.config import build_config
    from pipeline.run.planning import prepare_output
    from pipeline.table.ledger import Ledger
    from pipeline.table.records import Marker

    config = build_config({"input": {"uri": listing, "format": "filelist", "shard_size": 256},
                           "output": {"uri": output}, "model": {"path": "unused"}, "modes": "dual"})
    ledger = Ledger(output)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    work = prepare_output(ledger, config, {"fingerprint": config.fingerprint()}, overwrite=True)
    items = work.items()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for shard in work.pending:  # the run finished
        ledger.write_marker(Marker.of(shard, {"rows": 256, "ok": 256, "errors": 0}))
    keys = work.plan["images_known"]
    with open(listing, "a") as handle:  # the dataset grew by a tenth
        for index in range(keys, keys + keys // 10):
            handle.write(f"s3://bucket/dataset/part-{index // 10000:05d}/image-{index:09d}.jpg\n")
    started = time.perf_counter()
    grown = prepare_output(ledger, config, {})
    grow_seconds = time.perf_counter() - started
    return {"shards": len(items), "seconds": seconds, "peak_rss_mib": peak, "rss_before_mib": before,
            "grow_seconds": grow_seconds, "grown_shards": len(grown.pending),
            "grow_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(keys: int, scratch: Path) -> dict[str, float]:
    listing = scratch / f"list-{keys}.txt"
    with listing.open("w") as handle:
        for index in range(keys):
            handle.write(f"s3://bucket/dataset/part-{index // 10000:05d}/image-{index:09d}.jpg\n")
    code = (f"import json,sys; sys.path.insert(0,{str(REPO)!r}); import bench.bench_plan as b; "
            f"print(json.dumps(b.plan_only({str(listing)!r}, {str(scratch / f'out-{keys}')!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {"keys": keys, **json.loads(done.stdout.strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        small = measure(args.keys // 10, Path(scratch))
        large = measure(args.keys, Path(scratch))
    for row in (small, large):
        print(f"{row['keys']:>9} keys: {row['shards']:>6} shards planned in {row['seconds']:6.1f} s, "
              f"driver peak RSS {row['peak_rss_mib']:7.1f} MiB (after imports {row['rss_before_mib']:.1f} MiB); "
              f"grown by a tenth: re-listed and {row['grown_shards']} new shards planned in "
              f"{row['grow_seconds']:6.1f} s, peak RSS {row['grow_peak_rss_mib']:7.1f} MiB")
    growth = large["peak_rss_mib"] / small["peak_rss_mib"]
    print(f"peak RSS ratio {args.keys} / {args.keys // 10} keys: {growth:.2f} (planning), "
          f"{large['grow_peak_rss_mib'] / small['grow_peak_rss_mib']:.2f} (after growing)")
    if args.json:
        args.json.write_text(json.dumps({"small": small, "large": large, "rss_ratio": growth}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
