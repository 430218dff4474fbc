"""Storage access (fsspec), input layouts and containers, shards, listing and retries."""
