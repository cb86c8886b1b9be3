"""Command-line tools, one module per command, each with `build_parser()` and `main(argv) -> int`."""
