"""Every name the pipeline gives a file or folder of an output, in one place.

    _lease.json                      LEASE: the single-writer lease (lease.py); `.lease.lock` beside it locally
    _manifest.json                   MANIFEST: resolved config, fingerprint, model and engine versions
    _plan/<shard>.json               plan_path: a shard's plan; _plan/_complete.json (plan_done_path) last
    _staging/<shard>/...             staging_dir: a shard's caption fragments while it is in progress,
    _staging/<shard>/_expected.json  expected_path: the keys its read task yielded
    data/part-<shard>.parquet        part_path: the table, one file per committed shard
    _markers/<shard>.json            marker_path: written last, the shard is done only once it exists

Shard ids are six digits or more (`000042`). The path functions take the output's root path (no protocol)
and return a path inside it; with an empty root they return the path relative to the output (for messages).
What the files hold and in which order they are written is ledger.py's and fragments.py's.
"""

from __future__ import annotations

import re

from pipeline.io.fs import TEMPORARY_PATTERN, join

LEASE = "_lease.json"
LEASE_LOCK = ".lease.lock"  # local outputs: the lease's lock file, never deleted (lease.py)
MANIFEST = "_manifest.json"
PLAN = "_plan"
PLAN_DONE = "_complete.json"  # in PLAN, written after every shard's plan
STAGING = "_staging"
EXPECTED = "_expected.json"  # in a shard's staging folder
MARKERS = "_markers"
DATA = "data"
# Names a pipeline output is made of; a foreign folder holding any of them is never written into. (The lease
# is not one: a run writes it before it looks, and a foreign folder may hold a run's lease only.)
RESERVED = (MANIFEST, PLAN, STAGING, MARKERS, DATA)
# The folders runs create, in the order a wipe empties them (markers first: nothing then counts as done).
FOLDERS = (MARKERS, DATA, STAGING, PLAN)

SHARD_ID = re.compile(r"\d{6,}")
SHARD_FILE = re.compile(r"^\d{6,}\.json$")  # a shard's plan or marker
# A part file, or the temporary file a killed local write of one left (pipeline.io.fs.temporary_beside).
PART_FILE = re.compile(rf"^(?:{TEMPORARY_PATTERN})?part-(\d{{6,}})\.parquet$")


def shard_file(shard_id: str) -> str:
    """The file name of a shard's plan or marker."""
    return f"{shard_id}.json"


def shard_of_file(name: str) -> str:
    """The shard id a plan or marker file name (a SHARD_FILE) stands for."""
    return name.removesuffix(".json")


def part_name(shard_id: str) -> str:
    return f"part-{shard_id}.parquet"


def manifest_path(root: str) -> str:
    return join(root, MANIFEST)


def lease_path(root: str) -> str:
    return join(root, LEASE)


def plan_path(root: str, shard_id: str) -> str:
    return join(root, PLAN, shard_file(shard_id))


def plan_done_path(root: str) -> str:
    return join(root, PLAN, PLAN_DONE)


def staging_dir(root: str, shard_id: str) -> str:
    return join(root, STAGING, shard_id)


def expected_path(root: str, shard_id: str) -> str:
    return join(root, STAGING, shard_id, EXPECTED)


def part_path(root: str, shard_id: str) -> str:
    return join(root, DATA, part_name(shard_id))


def marker_path(root: str, shard_id: str) -> str:
    return join(root, MARKERS, shard_file(shard_id))
