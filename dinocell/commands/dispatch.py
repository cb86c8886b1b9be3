"""Dispatch a sub-command to its module's `main(argv)`: what `dinocell <command>` and `dinocell eval <task>` share.

Modules are imported only when their command runs, so `--help` is instant and one tool's optional dependencies never
break another.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Sequence

# name -> (module with a `main(argv: list[str] | None) -> int | None`, one-line description)
Table = dict[str, tuple[str, str]]


def listing(table: Table) -> list[str]:
    width = max(map(len, table))
    return [f"  {name:<{width}}  {description}" for name, (_, description) in table.items()]


def dispatch(prog: str, table: Table, argv: Sequence[str], usage: str, noun: str = "command") -> int:
    """Run `table[argv[0]]` with the rest of `argv`. No name prints `usage` on stderr (exit 2), --help on stdout; an
    unknown name is refused with the closest one."""
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    name, rest = argv[0], list(argv[1:])
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"{prog}: unknown {noun} '{name}'.{hint}\n\n{usage}", file=sys.stderr)
        return 2
    return int(importlib.import_module(table[name][0]).main(rest) or 0)
