"""Command-line tools, one module per `dinocell <command>`, each with `build_parser()` and `main(argv) -> int`."""
