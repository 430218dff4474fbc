"""Operational numbers the config does not set, each with its reason, in one place.

They bound how long the pipeline waits, retries and redoes; none of them changes what a row contains
(so none is in the fingerprint). The config layer is below every layer that uses them.
"""

from __future__ import annotations

# The output's single-writer lease (table/lease.py) ----------------------------------------------------
# How long a lease lives without a renewal. The holder renews every third of it (10 s), so a storage
# hiccup of a few seconds never loses a live run its lease; a run killed on another host blocks its
# output for at most this long (on the lease's own machine a dead holder frees it at once).
LEASE_TTL_S = 30.0
# The fence (lease.py, DESIGN invariant 12): a part file or marker is written only while the writer's last
# successful renewal plus the TTL is more than this share of the TTL ahead of its clock (10 s of 30). It must
# cover the disagreement between hosts' clocks (NTP keeps it well under a second; another run takes over at
# expiry on its own clock) and one write that was let through just before the deadline. A third equals the
# heartbeat interval, so a late or failed renewal alone never stops a run: the fence trips only once renewals
# (retried every second) have failed for a whole interval past the one that was due.
LEASE_FENCE_MARGIN_SHARE = 1 / 3

# Reading the input (io/retry.py) -----------------------------------------------------------------------
# Attempts at one read before a transient error (throttling, 5xx, timeouts, dropped connections) is given
# up on as TransientStorageError. With the backoff below the waits are 0.5, 1, 2, 4 and 8 s (each jittered
# down to half), so a read rides out about 8-15 s of trouble: S3 throttling usually passes in that time.
READ_ATTEMPTS = 6
# The wait before the second attempt; doubled for each later one. Short enough not to slow a read that
# met one dropped connection, long enough that readers throttled together back off.
READ_RETRY_BASE_DELAY_S = 0.5
# No single wait is longer, whatever the attempts (tests and callers may raise them): a read task never
# sleeps long on one file while its shard's others wait.
READ_RETRY_MAX_DELAY_S = 20.0
# Times Ray runs a read task again once storage failed it (a TransientStorageError after READ_ATTEMPTS):
# trouble that outlived a read's own retries gets three more tries of the whole task before the run fails
# (it never turns a storage outage into error rows).
READ_TASK_RETRIES = 3

# Commits and passes (run/commit.py, run/driver.py) -----------------------------------------------------
# Times Ray runs a commit task again when its worker died or storage failed it past its own retries
# (commit_tasks > 0; TransientStorageError only): a commit is safe to run twice (a retried one finds its
# marker), and a worker lost three times in a row is a cluster problem, not luck.
COMMIT_TASK_RETRIES = 3
# Passes of one run: a pass redoes only the shards the previous one could not commit (a refused merge, rows
# lost with an actor). A shard still failing after three is failing for a reason a re-run will not fix by
# itself, so the run stops and says which shards; re-running later finishes them.
MAX_PASSES = 3

# Status (table/status.py) ------------------------------------------------------------------------------
# The ETA uses the shard rate over this much recent history: long enough to average over several commits,
# short enough to follow a run whose pace changed (a cluster that grew, a slower part of the input).
STATUS_RATE_WINDOW_S = 900.0
