"""Resuming a run without damaging it: what a rerun in an existing output directory checks before it writes.

- `check_config_change` compares the new config with the run's saved `config.yaml` when there are checkpoints to
  resume: a change of the model's or the heads' shapes is refused (naming the keys, old -> new, and the way out); a
  change of the schedule or data (batch size, epochs, lr, ...) is reported as a warning; anything else in one line.
- `resume_from_checkpoint` loads the newest readable checkpoint into the TrainState (none readable stops the run, see
  dinocell.train.checkpoint) and moves newer unreadable ones aside, so that pruning by iteration never deletes the good
  checkpoint in their favour.
- `set_aside_run` (--no-resume) moves everything an earlier run wrote into one folder, so nothing of it mixes with the
  new run's files or is picked up by a later resume.

The caller saves the new config.yaml only once the resume has worked: a refused or failed resume leaves the run
directory as it was.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinocell import distributed
from dinocell.config import SSLConfig, config_to_dict
from dinocell.config.loading import leaves
from dinocell.errors import UserError
from dinocell.logging.sinks import METRICS_FILE
from dinocell.train.checkpoint import list_checkpoints, load_latest_checkpoint
from dinocell.train.state import TrainState

logger = logging.getLogger("dinocell")

CONFIG_FILE = "config.yaml"
# What a run writes into its output directory (the slurm/ folder of `dinocell submit` belongs to the job, not the run)
RUN_OUTPUTS = (CONFIG_FILE, "ckpt", "eval", "logs", METRICS_FILE, "training_curves.png", "tensorboard", "wandb")
# Keys that shape the model's parameters: a checkpoint cannot be loaded into a model built with other values
SHAPE_KEYS = (
    "method", "student.arch", "student.patch_size", "student.in_chans", "student.n_storage_tokens",
    "ibot.separate_head",
    *(f"{head}.head_{size}" for head in ("dino", "ibot") for size in ("n_prototypes", "bottleneck_dim", "nlayers",
                                                                      "hidden_dim")),
    *(f"simclr.head_{size}" for size in ("nlayers", "hidden_dim", "out_dim", "batchnorm")),
)  # fmt: skip
# Keys that change what the resumed iterations compute: the schedules, the batch, the data stream
SCHEDULE_KEYS = ("train.batch_size_per_gpu", "train.grad_accum_steps", "train.OFFICIAL_EPOCH_LENGTH", "train.seed",
                 "train.dataset_path", "train.centering")
SCHEDULE_SECTIONS = ("optim.", "teacher.")
NOT_COMPARED = ("train.output_dir",)  # a run directory may be moved or copied


class ResumeError(UserError):
    """A rerun that cannot continue the run in its output directory without damaging it."""


def _way_out(out: Path) -> str:
    return (f"start a new run instead: another --output-dir, or --no-resume (which moves the old run into "
            f"{out}/replaced-<time>/)")


def _listed(changed: dict[str, tuple[Any, Any]], keys: list[str]) -> str:
    return "; ".join(f"{key} {changed[key][0]!r} -> {changed[key][1]!r}" for key in sorted(keys))


def _changes_shape(key: str, old: Any, new: Any) -> bool:
    # LayerScale's value only initialises its parameters; switching it on or off adds or removes them
    return key in SHAPE_KEYS or (key == "student.layerscale" and (old is None) != (new is None))


def check_config_change(cfg: SSLConfig, out: Path) -> list[str]:
    """Compare `cfg` with the saved config of the run it would resume; raise ResumeError for a change of the model's
    shape, return the warnings to log for the other changes. Nothing to compare (no checkpoint, or no saved config):
    no message."""
    saved = out / CONFIG_FILE
    if not list_checkpoints(out / "ckpt") or not saved.is_file():
        return []
    try:
        old = dict(leaves(OmegaConf.to_container(OmegaConf.load(saved), resolve=True)))
    except Exception as err:  # YAML syntax or a broken interpolation: the file is not what dinocell wrote
        raise ResumeError(f"{saved} is not readable ({type(err).__name__}: {err}); restore it, or "
                          f"{_way_out(out)}") from None
    new = dict(leaves(config_to_dict(cfg)))
    changed = {key: (old[key], new[key]) for key in old.keys() & new.keys()
               if old[key] != new[key] and key not in NOT_COMPARED}
    refused = [key for key, (a, b) in changed.items() if _changes_shape(key, a, b)]
    if refused:
        raise ResumeError(
            f"cannot resume the run in {out}: its checkpoints hold another model ({_listed(changed, refused)}); keep "
            f"the old value(s) to resume it, or {_way_out(out)}"
        )
    schedule = [key for key in changed if key in SCHEDULE_KEYS or key.startswith(SCHEDULE_SECTIONS)]
    others = [key for key in changed if key not in schedule]
    messages = []
    if schedule:
        messages.append(f"resuming with changed schedule or data settings: {_listed(changed, schedule)} (the resumed "
                        "iterations follow the new values, so the run differs from one that had them from the start)")
    if others:
        messages.append(f"resuming with other changed settings: {_listed(changed, others)}")
    return messages


def resume_from_checkpoint(ckpt_root: Path, state: TrainState, total_iterations: int, *, is_main: bool) -> Path | None:
    """Load the newest readable checkpoint into `state` (every rank; collective) and return its directory, or None
    when there is none. A checkpoint that does not fit the model, or lies beyond the run's end, is a ResumeError."""
    latest = load_latest_checkpoint(ckpt_root, state.sharded_template)
    if latest is None:
        return None
    ckpt_dir, saved = latest
    try:
        state.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError) as err:  # size mismatch, other optimiser groups, missing entries
        reason = str(err).strip().splitlines()[-1].strip()
        raise ResumeError(
            f"checkpoint {ckpt_dir} does not fit the model of this config ({reason}); resume with the settings it was "
            f"trained with, or {_way_out(ckpt_root.parent)}"
        ) from err
    if state.iteration > total_iterations:
        raise ResumeError(
            f"checkpoint {ckpt_dir} is at iteration {state.iteration}, beyond the {total_iterations} iterations of "
            "this config (optim.epochs x train.OFFICIAL_EPOCH_LENGTH); raise optim.epochs to continue the run, or "
            f"{_way_out(ckpt_root.parent)}"
        )
    distributed.barrier()  # every rank has read its checkpoint before newer unreadable ones are renamed
    if is_main:
        for newer in list_checkpoints(ckpt_root):
            if int(newer.name) > int(ckpt_dir.name):
                kept = newer.with_name(f"{newer.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
                newer.rename(kept)
                logger.warning("moved the unreadable checkpoint %s to %s (it is no longer resumed from or pruned)",
                               newer, kept)
    return ckpt_dir


def set_aside_run(out: Path) -> Path | None:
    """Move what an earlier run wrote into `out/replaced-<time>/`; return that folder (None: nothing to move)."""
    present = [out / name for name in RUN_OUTPUTS if (out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = out / f"replaced-{stamp}", 1
    while folder.exists():  # two fresh starts within one second
        folder, n = out / f"replaced-{stamp}-{n}", n + 1
    folder.mkdir()
    for path in present:
        path.rename(folder / path.name)
    return folder
