"""Checkpoint files: atomic writes, pruning, fallback over damaged files, RNG round-trip, eval dumps."""

import random

import numpy as np
import pytest
import torch

from dinocell.models.pretrained import TEACHER_FILE
from dinocell.train import checkpoint as ckpt


def _state(i: int) -> dict:
    return {"model": {"w": torch.full((3,), float(i))}, "iteration": i, "rng": [ckpt.capture_rng_state()]}


def test_save_list_and_prune(tmp_path):
    for i in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, i, _state(i), max_to_keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["30", "40"]
    path, state = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "40" and state["iteration"] == 40 and torch.equal(state["model"]["w"], torch.full((3,), 40.0))
    assert not list(tmp_path.glob(".tmp-*"))


def test_crash_while_writing_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 10, _state(10), max_to_keep=3)

    def dying_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full / killed")

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 20, _state(20), max_to_keep=3)
    monkeypatch.undo()
    assert (tmp_path / ".tmp-20").exists() and not (tmp_path / "20").exists()
    path, state = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "10" and state["iteration"] == 10
    ckpt.save_checkpoint(tmp_path, 20, _state(20), max_to_keep=3)  # the next save clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "20"]


def test_crash_while_replacing_a_checkpoint_directory_keeps_a_complete_copy(tmp_path, monkeypatch):
    """An iteration saved again (after a resume): the old copy is moved aside, never deleted first."""
    ckpt.save_checkpoint(tmp_path, 10, _state(1), max_to_keep=3)
    real_rename = ckpt.os.rename

    def dying_rename(src, dst):
        if str(src).endswith(".tmp-10"):
            raise OSError("killed between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", dying_rename)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_checkpoint(tmp_path, 10, _state(2), max_to_keep=3)
    monkeypatch.undo()
    old = torch.load(tmp_path / ".old-10" / ckpt.CHECKPOINT_FILE, weights_only=True)
    assert old["iteration"] == 1  # the previous checkpoint survives, complete
    ckpt.save_checkpoint(tmp_path, 10, _state(2), max_to_keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10"]
    assert torch.load(tmp_path / "10" / ckpt.CHECKPOINT_FILE, weights_only=True)["iteration"] == 2


def test_an_eval_dump_replaces_only_its_file(tmp_path, monkeypatch):
    """eval/<iteration>/ also holds that iteration's evaluations: a dump (again) replaces its own file atomically and
    leaves the rest; a crash while writing leaves the previous dump."""
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "knn.json").write_text("{}")
    ckpt.save_eval_dump(tmp_path / "final", {"teacher": {"w": torch.zeros(2)}})

    def dying_replace(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(ckpt.os, "replace", dying_replace)
    with pytest.raises(OSError, match="killed"):
        ckpt.save_eval_dump(tmp_path / "final", {"teacher": {"w": torch.ones(2)}})
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "final" / TEACHER_FILE, weights_only=True)["teacher"]["w"],
                       torch.zeros(2))
    ckpt.save_eval_dump(tmp_path / "final", {"teacher": {"w": torch.ones(2)}})
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["knn.json", TEACHER_FILE]  # no debris
    assert torch.equal(torch.load(tmp_path / "final" / TEACHER_FILE, weights_only=True)["teacher"]["w"],
                       torch.ones(2))


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path):
    ckpt.save_checkpoint(tmp_path, 10, _state(10), max_to_keep=3)
    (tmp_path / "20").mkdir()
    (tmp_path / "20" / ckpt.CHECKPOINT_FILE).write_bytes(b"truncated")
    path, state = ckpt.load_latest_checkpoint(tmp_path)
    assert path.name == "10" and state["iteration"] == 10


def test_no_checkpoint_gives_none(tmp_path):
    assert ckpt.load_latest_checkpoint(tmp_path / "missing") is None


def test_rng_state_round_trip_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    ckpt.save_checkpoint(tmp_path, 1, _state(1), max_to_keep=1)
    expected = (random.random(), np.random.rand(), np.random.normal(), torch.rand(2))
    _, state = ckpt.load_latest_checkpoint(tmp_path)  # weights_only=True
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.restore_rng_state(state["rng"][0])
    got = (random.random(), np.random.rand(), np.random.normal(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_eval_dump_format(tmp_path):
    teacher = {"backbone.cls_token": torch.zeros(1, 1, 4), "dino_head.last_layer.weight": torch.ones(8, 4)}
    path = ckpt.save_eval_dump(tmp_path / "eval" / "final", {"teacher": teacher})
    assert path == tmp_path / "eval" / "final" / "teacher_checkpoint.pth"
    loaded = torch.load(path, weights_only=True)
    assert set(loaded) == {"teacher"}
    assert torch.equal(loaded["teacher"]["dino_head.last_layer.weight"], torch.ones(8, 4))
    ckpt.save_eval_dump(tmp_path / "eval" / "final", {"teacher": {"backbone.cls_token": torch.ones(1, 1, 4)}})
    assert torch.equal(torch.load(path, weights_only=True)["teacher"]["backbone.cls_token"], torch.ones(1, 1, 4))
    student = {"backbone.conv1.weight": torch.ones(2, 1, 1, 1), "projection_head.mlp.0.weight": torch.ones(3, 2)}
    path = ckpt.save_eval_dump(tmp_path / "eval" / "final", {"student": student})  # SimCLR's, next to DINO's
    assert path == tmp_path / "eval" / "final" / "student_checkpoint.pth"
    assert torch.equal(torch.load(path, weights_only=True)["student"]["projection_head.mlp.0.weight"], torch.ones(3, 2))


def test_best_checkpoint_is_never_pruned_nor_resumed_from(tmp_path):
    ckpt.save_checkpoint(tmp_path, ckpt.BEST, _state(5), max_to_keep=1)
    for i in (10, 20):
        ckpt.save_checkpoint(tmp_path, i, _state(i), max_to_keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20", "best"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["20"]
    assert ckpt.load_latest_checkpoint(tmp_path)[1]["iteration"] == 20
    assert torch.load(tmp_path / "best" / ckpt.CHECKPOINT_FILE, weights_only=True)["iteration"] == 5
