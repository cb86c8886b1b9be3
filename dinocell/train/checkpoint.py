"""Crash-safe checkpoints, eval dumps and RNG state capture.

Layout: `output_dir/ckpt/<iteration>/`, and the best one by the validation metric in `output_dir/ckpt/best/` (never
pruned, never resumed from), each in one of two forms:
- single file (`train.parallelism=ddp`): `checkpoint.pth`, written by rank 0;
- sharded (`train.parallelism=fsdp`): a torch.distributed.checkpoint (DCP) directory, where every rank writes its
  shards of the model and of the optimiser state (`__<rank>_0.distcp`, indexed by `.metadata`), plus
  `train_state.pth` with the rest (iteration, RNG states, optimiser hyper-parameters). DCP reshards on loading, so a
  run resumes on any number of processes, and either parallelism reads either form.
A checkpoint is written into a hidden temporary directory, fsynced, then renamed: the rename is atomic, so a checkpoint
directory is always complete and a crash while writing leaves at most a stray `.tmp-*` directory that the next save
removes. Everything stored outside DCP's index is readable with `torch.load(weights_only=True)` (tensors, numbers,
strings, lists, dicts, None); DCP stores only tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

from dinocell import distributed
from dinocell.errors import UserError
from dinocell.models.pretrained import CHECKPOINT_FILE, EVAL_DUMP_FILES, why_unreadable

SHARDED_STATE_FILE = "train_state.pth"  # the small, unsharded part of a sharded checkpoint


class PartialLoadError(RuntimeError):
    """A sharded checkpoint failed while being loaded into the run's own tensors: the model may hold part of it, so
    neither an older checkpoint nor a fresh start may follow."""

logger = logging.getLogger("dinocell")


class UnreadableCheckpointsError(UserError):
    """Checkpoints exist but none can be read: the run stops rather than start over (and rotate them away)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging_dir(final_dir: Path) -> Path:
    return final_dir.parent / f".tmp-{final_dir.name}"


def _write_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp_dir: Path, final_dir: Path) -> None:
    """Rename the complete `tmp_dir` to `final_dir`, atomically."""
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


def atomic_save(obj: Any, final_dir: Path, filename: str) -> Path:
    """Write `obj` to `final_dir/filename` via a temporary sibling directory and an atomic rename."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = _staging_dir(final_dir)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    _write_file(obj, tmp_dir / filename)
    _publish(tmp_dir, final_dir)
    return final_dir / filename


def _save_sharded(state: dict[str, Any], final_dir: Path) -> None:
    """Collective: each rank writes its shards of the model and optimiser state; rank 0 the rest, then renames."""
    tmp_dir = _staging_dir(final_dir)
    if distributed.get_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir(parents=True)
    distributed.barrier()
    tensors, rest = _split(state)
    with _one_process_quietly():
        writer = dcp.FileSystemWriter(tmp_dir, sync_files=True)
        dcp.save(tensors, storage_writer=writer, no_dist=not distributed.is_enabled())  # returns once all ranks wrote
    if distributed.get_rank() == 0:
        _write_file(rest, tmp_dir / SHARDED_STATE_FILE)
        _publish(tmp_dir, final_dir)
    distributed.barrier()


@contextlib.contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes a single process whenever there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _split(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what DCP stores: model and optimiser tensors keyed by parameter name, what train_state.pth stores)."""
    optimizer = state["optimizer"]
    rest = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    rest["param_groups"] = optimizer["param_groups"]
    return {"model": state["model"], "optimizer": optimizer["state"]}, rest


def _is_complete(ckpt_dir: Path) -> bool:
    return (ckpt_dir / CHECKPOINT_FILE).is_file() or (ckpt_dir / SHARDED_STATE_FILE).is_file()


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first (temporary directories are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.isdigit() and _is_complete(d)]
    return sorted(dirs, key=lambda d: int(d.name))


BEST = "best"  # ckpt/best/: the checkpoint with the best validation metric so far


def save_checkpoint(ckpt_root: Path, iteration: int | str, state: dict[str, Any], max_to_keep: int, *,
                    sharded: bool = False) -> Path:
    """Save `state` as checkpoint `iteration` (or BEST) and keep only the newest `max_to_keep` numbered ones. Every
    rank calls it: a single-file checkpoint is written by rank 0; a sharded one (`state` from TrainState with
    sharded=True: the optimiser keyed by parameter name) by all ranks, and it is complete on every rank when this
    returns."""
    final_dir = Path(ckpt_root) / str(iteration)
    if sharded:
        _save_sharded(state, final_dir)
    elif distributed.get_rank() == 0:
        atomic_save(state, final_dir, CHECKPOINT_FILE)
    if distributed.get_rank() == 0:
        prune_checkpoints(ckpt_root, max_to_keep)
    return final_dir


def prune_checkpoints(ckpt_root: Path, max_to_keep: int) -> None:
    """Remove the debris of interrupted saves and all but the newest `max_to_keep` checkpoints."""
    for stray in [*Path(ckpt_root).glob(".tmp-*"), *Path(ckpt_root).glob(".old-*")]:
        shutil.rmtree(stray, ignore_errors=True)
    for old in list_checkpoints(ckpt_root)[:-max_to_keep] if max_to_keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
def _check_shard_files(ckpt_dir: Path) -> None:
    """Raise when a shard file DCP's index names is missing or shorter than the data it should hold (a damaged or
    partly copied checkpoint), before anything is loaded into the model."""
    metadata = dcp.FileSystemReader(ckpt_dir).read_metadata()
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in needed.items():
        path = ckpt_dir / name
        if not path.is_file() or path.stat().st_size < size:
            raise OSError(f"{path} is missing or truncated")


def read_checkpoint(ckpt_dir: Path, template: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """A checkpoint's contents as `save_checkpoint` got them. A sharded checkpoint is loaded into the tensors of
    `template()` (TrainState.sharded_template: this run's own model and optimiser state, sharded or not), which
    reshards it to this run's processes; its files are checked first, so that a damaged checkpoint is found before
    anything is loaded (PartialLoadError if loading fails nonetheless)."""
    if (ckpt_dir / CHECKPOINT_FILE).is_file():
        return torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    rest = torch.load(ckpt_dir / SHARDED_STATE_FILE, map_location="cpu", weights_only=True)
    _check_shard_files(ckpt_dir)
    if template is None:
        raise ValueError(f"{ckpt_dir} is a sharded checkpoint: reading it needs the run's state as a template")
    state = template()
    tensors = {"model": state["model"], "optimizer": state["optimizer"]["state"]}
    try:
        with _one_process_quietly():
            dcp.load(tensors, storage_reader=dcp.FileSystemReader(ckpt_dir), no_dist=not distributed.is_enabled())
    except (Exception, dcp.CheckpointException) as err:  # DCP's exception is a BaseException
        raise PartialLoadError(f"{ckpt_dir} failed to load part-way ({type(err).__name__}, shown above); the run "
                               "cannot continue from this state: move the checkpoint aside and start again") from err
    optimizer = {"state": tensors["optimizer"], "param_groups": rest.pop("param_groups")}
    return {**rest, "model": tensors["model"], "optimizer": optimizer}


def load_latest_checkpoint(
    ckpt_root: Path, template: Callable[[], dict[str, Any]] | None = None
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; an unreadable one is reported and the previous one is tried. Every rank
    calls it and all take the same one (a checkpoint one rank cannot read is skipped by all). None when there is no
    checkpoint; UnreadableCheckpointsError when there are some and none loads."""
    unreadable = []
    for ckpt_dir in reversed(list_checkpoints(ckpt_root)):
        try:
            state, error = read_checkpoint(ckpt_dir, template), None
        except PartialLoadError:
            raise
        except Exception as err:  # a damaged file must not stop a 30-hour run from resuming from the previous one
            state, error = None, err
        reasons = distributed.all_gather_object(None if error is None else why_unreadable(error))
        failed = [reason for reason in reasons if reason is not None]
        if not failed:
            return ckpt_dir, state
        logger.warning("checkpoint %s is unreadable (%s); trying the previous one", ckpt_dir, failed[0])
        unreadable.append(f"{ckpt_dir.name} ({failed[0]})")
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
    student_checkpoint.pth. The file is replaced atomically (written beside it, then renamed over it); the rest of
    `eval_dir` (the evaluations of that iteration) stays."""
    ((role, _),) = dump.items()
    path = Path(eval_dir) / EVAL_DUMP_FILES[role]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(dump, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


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
