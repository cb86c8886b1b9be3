"""Crash-safe checkpoints, eval dumps and RNG state capture.

Layout: `output_dir/ckpt/<iteration>/checkpoint.pth`, the best one by the validation metric in
`output_dir/ckpt/best/checkpoint.pth` (never pruned, never resumed from). A checkpoint is written into a hidden
temporary directory, fsynced, then renamed: the rename is atomic, so a checkpoint directory is always complete and a
crash while writing leaves at most a stray `.tmp-*` directory that the next save removes. Everything stored is
readable with `torch.load(weights_only=True)` (tensors, numbers, strings, lists, dicts, None).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.errors import UserError
from dinocell.models.pretrained import CHECKPOINT_FILE, EVAL_DUMP_FILES, why_unreadable

logger = logging.getLogger("dinocell")


class UnreadableCheckpointsError(UserError):
    """Checkpoints exist but none can be read: the run stops rather than start over (and rotate them away)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, final_dir: Path, filename: str) -> Path:
    """Write `obj` to `final_dir/filename` via a temporary sibling directory and an atomic rename."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = final_dir.parent / f".tmp-{final_dir.name}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    with open(tmp_dir / filename, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp_dir)
    # An existing directory (eval/final of an earlier run, or an iteration saved again after a resume) is moved
    # aside, not deleted, until the new one is in place: a crash at any moment leaves a complete copy.
    replaced = final_dir.parent / f".old-{final_dir.name}"
    shutil.rmtree(replaced, ignore_errors=True)
    if final_dir.exists():
        os.rename(final_dir, replaced)
    os.rename(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return final_dir / filename


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary directories are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and (d / CHECKPOINT_FILE).is_file()]
    return sorted(dirs, key=lambda d: int(d.name))


BEST = "best"  # ckpt/best/: the checkpoint with the best validation metric so far


def save_checkpoint(ckpt_root: Path, iteration: int | str, state: dict[str, Any], max_to_keep: int) -> Path:
    """Save `state` as checkpoint `iteration` (or BEST) and keep only the newest `max_to_keep` numbered ones."""
    path = atomic_save(state, Path(ckpt_root) / str(iteration), CHECKPOINT_FILE)
    prune_checkpoints(ckpt_root, max_to_keep)
    return path


def prune_checkpoints(ckpt_root: Path, max_to_keep: int) -> None:
    """Remove the debris of interrupted saves and all but the newest `max_to_keep` checkpoints."""
    for stray in [*Path(ckpt_root).glob(".tmp-*"), *Path(ckpt_root).glob(".old-*")]:
        shutil.rmtree(stray, ignore_errors=True)
    for old in list_checkpoints(ckpt_root)[:-max_to_keep] if max_to_keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_latest_checkpoint(ckpt_root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; an unreadable one is reported and the previous one is tried. None when there
    is no checkpoint; UnreadableCheckpointsError when there are some and none loads."""
    unreadable = []
    for ckpt_dir in reversed(list_checkpoints(ckpt_root)):
        try:
            return ckpt_dir, torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file must not stop a 30-hour run from resuming from the previous one
            logger.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt_dir, why_unreadable(err))
            unreadable.append(f"{ckpt_dir.name} ({why_unreadable(err)})")
    if unreadable:
        raise UnreadableCheckpointsError(
            f"no checkpoint in {ckpt_root} can be read: {'; '.join(unreadable)}. They are left as they are. Restore a "
            "good copy into that folder and rerun, or start over with --no-resume (which moves the old run aside) or "
            "another --output-dir"
        )
    return None


def save_eval_dump(eval_dir: Path, dump: dict[str, dict[str, torch.Tensor]]) -> Path:
    """`{role: state dict}` -> `eval_dir/<role>_checkpoint.pth`: DINO's {"teacher": {"backbone.*", "dino_head.*",
    "ibot_head.*"}} in teacher_checkpoint.pth, SimCLR's {"student": {"backbone.*", "projection_head.*"}} in
    student_checkpoint.pth."""
    ((role, _),) = dump.items()
    return atomic_save(dump, Path(eval_dir), EVAL_DUMP_FILES[role])


def capture_rng_state() -> dict[str, Any]:
    """torch (and CUDA), python and numpy generator states in weights_only-loadable form."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
