"""Storage access (fsspec) and input sources."""
