"""Exports of a finished (or running) output: sidecar .txt files, JSONL, an HTML review gallery.

Every export reads committed shards only (see table.py), so it can run while the pipeline is still
writing and never shows half a shard.
"""
