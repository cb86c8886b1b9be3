"""The command-line tools, one module per `dinocell <command>`: argument parsing and messages around library calls."""
