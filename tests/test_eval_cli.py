"""`dinocell eval`: the task list, a suggestion for a mistyped task, and every task's --help with an example."""

from __future__ import annotations

import importlib

import pytest

from dinocell.commands.eval import TASKS, main


def test_task_list_and_suggestion(capsys):
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(task in listed for task in TASKS)
    assert main([]) == 2
    assert main(["profile_map"]) == 2
    assert "unknown task 'profile_map'. Did you mean 'profile-map'?" in capsys.readouterr().err


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_has_help_with_an_example(task, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([task, "--help"])
    shown = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: dinocell eval {task}" in shown
    assert "example" in shown and f"dinocell eval {task} " in shown.split("example", 1)[1]
    assert hasattr(importlib.import_module(TASKS[task][0]), "build_parser")
