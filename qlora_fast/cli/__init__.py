"""The `qlora-fast` command line: train, compare, merge, generate."""
