"""The shell examples of the README and docs/ work as pasted, where they need only the embedded data.

Every example is extracted (fenced bash blocks and inline code spans, `\\` continuations joined). Cheap ones
(`--help`, `--print-config`, `dinocell datasets`) are run; the others are checked against a demo-like run (the demo
config, shrunk): every `output/...` path they name must exist afterwards, and the README's pandas one-liner is run
on it. Examples that need data or weights from outside (placeholders, /path/to, /data, S3, clusters) are left out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dinocell.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROGRAMS = ("dinocell ", "python -c ", "./launch_ssl.sh", ".venv/bin/dinocell ")
# examples that need something not shipped with the repository, or stand for a family of commands
EXTERNAL = re.compile(
    r"/path/to|/data/|/shared/|JUMPS3MultiView:|\$|\.\.\.|\[|<|(?<![\w./-])[A-Z]{1,6}(?![\w:./-])"
)  # <task>: a placeholder
WRITTEN = re.compile(r"(?:--output-dir|--out)[ =](output/[\w./-]+)")  # what an example writes itself
# the demo config, shrunk to seconds: same output directory (train.output_dir: ./output/demo), same kinds of outputs
TINY_DEMO = [
    "train.dataset_path=SyntheticCellPainting:size=16:image_size=64:cell_radius=8", "train.batch_size_per_gpu=4",
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=1", "optim.warmup_epochs=0",
    "checkpointing.period=2", "train.log_every=1", "compute_precision.autocast_dtype=fp32", "evaluation.knn_k=[3]",
    "evaluation.knn_train_dataset=SyntheticCellPainting:split=train:size=8:image_size=64:cell_radius=8:seed=1",
    "evaluation.knn_test_dataset=SyntheticCellPainting:split=test:size=8:image_size=64:cell_radius=8",
    "evaluation.channel_consistency_dataset=SyntheticCellPainting:split=test:size=4:image_size=64:cell_radius=8",
    "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64",
]  # fmt: skip


def shell_examples() -> list[tuple[str, str]]:
    """(document, command) for every command line in fenced shell blocks and inline code spans; the command without
    its comment, re-quoted (shlex.join), so that shlex.split gives its arguments back."""
    examples = []
    for doc in DOCS:
        text = doc.read_text()
        fenced = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S)
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for block in fenced + inline:
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith(PROGRAMS):
                    examples.append((doc.name, shlex.join(shlex.split(line, comments=True))))
    return examples


def _cheap(command: str) -> bool:
    return "--help" in command or "--print-config" in command or command.startswith("dinocell datasets")


def _run_in_process(argv: list[str]) -> int:
    try:
        return cli_main(argv)
    except SystemExit as exit_:  # argparse's --help
        return int(exit_.code or 0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A folder like the repository root after `./launch_ssl.sh` (configs/ and a shrunk demo's output/demo/)."""
    work = tmp_path_factory.mktemp("clone")
    (work / "configs").symlink_to(ROOT / "configs")
    here = Path.cwd()
    os.chdir(work)  # the demo config writes to ./output/demo, as it does for a user
    try:
        assert cli_main(["train", "--config-file", "configs/train/demo.yaml", *TINY_DEMO]) == 0
    finally:
        os.chdir(here)
    return work


def test_extraction_finds_the_examples_users_copy():
    commands = [c for _, c in shell_examples()]
    assert "dinocell train --config-file configs/train/demo.yaml --print-config" in commands
    assert any(c.startswith("python -c 'import pandas as pd;") for c in commands)
    assert sum(_cheap(c) and not EXTERNAL.search(c) for c in commands) >= 4
    assert any(c.startswith("dinocell eval features --config-file output/demo/config.yaml") for c in commands)


def test_cheap_examples_run(demo_dir, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    ran = []
    for doc, command in shell_examples():
        if not _cheap(command) or EXTERNAL.search(command):
            continue
        argv = shlex.split(command)
        assert argv[0] in ("dinocell", ".venv/bin/dinocell"), (doc, command)
        code = _run_in_process(argv[1:])
        out = capsys.readouterr().out
        assert code == 0 and out.strip(), (doc, command)
        ran.append(command)
    assert len(ran) >= 4
    assert not (demo_dir / "runs").exists()  # --print-config writes nothing


def test_paths_named_by_examples_exist_after_the_demo(demo_dir, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    assert _run_in_process(["knn", "--help"]) == 0
    help_example = capsys.readouterr().out.split("example", 1)[1]
    commands = [c for _, c in shell_examples() if not EXTERNAL.search(c)] + [" ".join(help_example.split())]
    written = {path for c in commands for path in WRITTEN.findall(c)}
    named = {path for c in commands for path in re.findall(r"output/[\w./-]+", c)
             if not any(path == w or path.startswith(w + "/") for w in written)}
    recipes = {path for _, c in shell_examples() for path in re.findall(r"configs/train/[\w.-]+", c)}
    assert "configs/train/demo.yaml" in recipes and all((ROOT / path).is_file() for path in recipes), recipes
    assert {"output/demo/config.yaml", "output/demo/eval/final/teacher_checkpoint.pth",
            "output/demo/training_metrics.json"} <= named  # fmt: skip
    missing = sorted(path for path in named if not (demo_dir / path).exists())
    assert not missing, f"paths named in the docs that the demo does not write: {missing}"


def test_the_metrics_one_liner_runs_on_the_demo_output(demo_dir):
    one_liners = {c for _, c in shell_examples() if c.startswith("python -c ")}
    assert one_liners
    for command in one_liners:
        argv = shlex.split(command)
        shown = subprocess.run([sys.executable, *argv[1:]], cwd=demo_dir, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.split()[0] == "iteration" and "[2 rows x 18 columns]" in shown.stdout
