"""The output: its schema, records, manifest and fingerprint, file names, fragments, ledger, lease and
status. Everything a reader or a later run needs to know what is committed."""
