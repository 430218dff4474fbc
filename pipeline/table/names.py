"""Every name the pipeline gives a file or folder of an output, in one place.

    _lease.json                      LEASE: the single-writer lease (lease.py); `.lease.lock` beside it locally
    _manifest.json                   MANIFEST: resolved config, fingerprint, model and engine versions
    _plan/<shard>.json               plan_path: a shard's plan; _plan/_complete.json (plan_done_path) last
    _staging/<shard>/<run>/...       staging_dir: a shard's caption fragments while it is in progress, in
                                     the folder of the run (its lease's holder id) whose workers wrote them
    _staging/<shard>/<run>/_expected.json  expected_path: the keys that run's read task yielded
    data/part-<shard>.parquet        part_path: the table, one file per committed shard; a shard's part is
    data/part-<shard>-<run>.parquet  named by its marker: a redone shard (`--retry-errors`) gets its run's
                                     name (the first 12 digits of its id) so the old pair stays whole
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
RUN_TAG = 12  # hex digits of a run id in a part file's name
# A part file, or the temporary file a killed local write of one left (pipeline.io.fs.temporary_beside):
# group 1 is the shard id, group 2 the run tag of a redone shard's part (None for the first name).
PART_FILE = re.compile(rf"^(?:{TEMPORARY_PATTERN})?part-(\d{{6,}})(?:-([0-9a-f]{{{RUN_TAG}}}))?\.parquet$")
RUN_ID = re.compile(r"[0-9a-f]{8,64}")  # a run's id (its lease's holder id): its staging folder's name


def shard_file(shard_id: str) -> str:
    """The file name of a shard's plan or marker."""
    return f"{shard_id}.json"


def shard_of_file(name: str) -> str:
    """The shard id a plan or marker file name (a SHARD_FILE) stands for."""
    return name.removesuffix(".json")


def part_name(shard_id: str, run_id: str | None = None) -> str:
    """A shard's part file name: `part-<shard>.parquet`, or with `run_id` the name of that run's part of it
    (`part-<shard>-<first 12 digits of the run id>.parquet`)."""
    return f"part-{shard_id}-{run_id[:RUN_TAG]}.parquet" if run_id else f"part-{shard_id}.parquet"


def manifest_path(root: str) -> str:
    return join(root, MANIFEST)


def lease_path(root: str) -> str:
    return join(root, LEASE)


def plan_path(root: str, shard_id: str) -> str:
    return join(root, PLAN, shard_file(shard_id))


def plan_done_path(root: str) -> str:
    return join(root, PLAN, PLAN_DONE)


def staging_dir(root: str, shard_id: str, run_id: str | None = None) -> str:
    """The staging folder of `run_id`'s fragments of a shard; without a run id the shard's folder itself
    (which holds every run's: clearing it clears them all)."""
    return join(root, STAGING, shard_id, run_id) if run_id else join(root, STAGING, shard_id)


def expected_path(root: str, shard_id: str, run_id: str | None = None) -> str:
    return join(staging_dir(root, shard_id, run_id), EXPECTED)


def part_path(root: str, shard_id: str, name: str | None = None) -> str:
    """A shard's part file: `name` (a marker's `part`) in `data/`, by default `part-<shard>.parquet`."""
    return join(root, DATA, name or part_name(shard_id))


def marker_path(root: str, shard_id: str) -> str:
    return join(root, MARKERS, shard_file(shard_id))
