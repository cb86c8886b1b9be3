"""Files of a dataset folder and their labels: `root/<class>/**/<file>`, or files directly in `root`, unlabelled."""

from __future__ import annotations

from pathlib import Path


def files_by_class(root: Path, suffixes: tuple[str, ...]) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(file, class index)]): the classes are the top-level sub-folders of `root` sorted by name, each
    holding the files below it (any depth, sorted); with no sub-folders, the files directly in `root` with label -1.
    Only files whose suffix (any case) is in `suffixes` count; hidden files and folders are skipped."""

    def wanted(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith(".")

    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_dirs:
        files = [(f, k) for k, d in enumerate(class_dirs) for f in sorted(d.rglob("*")) if wanted(f)]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if wanted(f)]
    return [d.name for d in class_dirs], files
