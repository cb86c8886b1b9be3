"""Training as a Slurm job through submitit: one task per GPU, requeued on timeout or preemption, resumed from disk.

A job is `srun` with `nodes x tasks_per_node` tasks; each task runs the training command, and the process group forms
from Slurm's variables (dinocell.distributed). The merged configuration is frozen into the run directory when the job
is submitted (`<output_dir>/slurm/config-<time>.yaml`), so editing the recipe while the job waits or between requeues
changes nothing, and a bad key fails at submission rather than hours later in the queue.

Requeue: Slurm sends USR2 to every task `signal_delay_s` before the time limit (and schedulers send it on
preemption). The training loop then stops at the next iteration boundary after writing a checkpoint of it (as for
SIGTERM, with `checkpointing.save_on_sigterm`), and only then does submitit's handler run: on rank 0 it calls
`TrainingTask.checkpoint()`, which resubmits the same task, and requeues the job under the same id. So a requeue
recomputes nothing. If that checkpoint is not written within `REQUEUE_DEADLINE_SHARE` of the signal delay, or no
training loop runs yet, the job is requeued at once and resumes from the newest periodic checkpoint instead: a
requeue must happen before the time limit, or the job ends. The task carries no training state: every attempt
resumes from the newest complete checkpoint in `<output_dir>/ckpt/`, so a requeue that never called `checkpoint()`
(`scontrol requeue`, a failed node with `--requeue`) resumes the same way.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from dinocell.commands.common import load_checked_config
from dinocell.config import SSLConfig, save_config
from dinocell.errors import UsageError
from dinocell.train.signals import request_stop

SLURM_FOLDER = "slurm"  # under the run directory: batch scripts, task logs, submitit's pickles, frozen configs
MAX_TIMEOUTS = 20  # time-limit requeues before a job is left to end (a 24 h limit: 3 weeks of training)
REQUEUE_DEADLINE_SHARE = 0.75  # of signal_delay_s: the checkpoint before a requeue must be written by then


def run_training(argv: list[str]) -> int:
    """The training command (`dinocell train`), the one place this module calls into training."""
    from dinocell.commands.train import main

    return main(argv)


@dataclass(frozen=True)
class SlurmResources:
    """What one job asks Slurm for. With GPUs, one task per GPU; `tasks_per_node` is for CPU-only clusters."""

    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None
    cpus_per_task: int | None = None  # None: train.num_workers + 1 (the loader workers and the training process)
    mem_gb: int | None = None  # None: the partition's default
    time_min: int = 1440
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    comment: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to finish a step and exit

    def __post_init__(self) -> None:
        for name in ("nodes", "time_min", "signal_delay_s"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("tasks_per_node", "cpus_per_task", "mem_gb"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1 when given, got {getattr(self, name)}")
        if self.gpus_per_node < 0:
            raise UsageError(f"gpus_per_node must be >= 0, got {self.gpus_per_node}")
        if self.signal_delay_s >= self.time_min * 60:
            raise UsageError(f"signal_delay_s={self.signal_delay_s} must be shorter than the time limit "
                             f"({self.time_min * 60} s): the requeue signal would come before training starts")
        if self.gpus_per_node and self.tasks_per_node not in (None, self.gpus_per_node):
            raise UsageError(
                f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: training runs one task "
                f"per GPU; leave tasks_per_node unset (it is for CPU-only clusters, with gpus_per_node=0)"
            )

    @property
    def tasks(self) -> int:
        return self.gpus_per_node or self.tasks_per_node or 1


def parse_time_minutes(text: str) -> int:
    """Slurm's time-limit formats -> whole minutes (submitit counts in minutes; seconds round up): MM, MM:SS,
    HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, has_days, clock = text.strip().partition("-")
    if not has_days:
        days, clock = "0", text.strip()
    try:
        numbers = [int(field) for field in clock.split(":")]
        if len(numbers) > 3 or int(days) < 0 or min(numbers) < 0:
            raise ValueError
        if has_days:
            hours, minutes, seconds = [*numbers, 0, 0][:3]
        else:
            hours, minutes, seconds = numbers if len(numbers) == 3 else [0, *numbers, 0][:3]
        total = int(days) * 1440 + hours * 60 + minutes + (seconds > 0)
        if total < 1:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"time limit '{text}': expected minutes (e.g. 1440), HH:MM:SS (e.g. 24:00:00) or D-HH[:MM[:SS]] "
            "(e.g. 2-12:00:00), at least one minute"
        ) from None
    return total


def load_run_config(config_file: str | None, overrides: Sequence[str], output_dir: str | None) -> SSLConfig:
    """The merged, validated training config with an absolute run directory (tasks may start elsewhere)."""
    overrides = list(overrides) + ([f"train.output_dir={output_dir}"] if output_dir is not None else [])
    cfg = load_checked_config(config_file, overrides)
    cfg.train.output_dir = str(Path(cfg.train.output_dir).expanduser().resolve())
    return cfg


def sbatch_parameters(resources: SlurmResources, cfg: SSLConfig) -> dict[str, Any]:
    """submitit.SlurmExecutor parameters (sbatch's option names) for training `cfg` with `resources`."""
    params: dict[str, Any] = {
        "job_name": f"dinocell-{Path(cfg.train.output_dir).name}",
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks,
        "cpus_per_task": resources.cpus_per_task or cfg.train.num_workers + 1,
        "time": resources.time_min,
        "signal_delay_s": resources.signal_delay_s,
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb is not None:
        params["mem"] = f"{resources.mem_gb}G"
    for name in ("partition", "account", "qos", "constraint", "exclude", "comment"):
        if getattr(resources, name) is not None:
            params[name] = getattr(resources, name)
    return params


def slurm_folder(cfg: SSLConfig) -> Path:
    return Path(cfg.train.output_dir) / SLURM_FOLDER


def batch_script(cfg: SSLConfig, parameters: dict[str, Any]) -> str:
    """The batch script `submit` hands to sbatch (what `dinocell submit --dry-run` prints); needs no Slurm."""
    from submitit.slurm.slurm import _make_sbatch_string  # the text SlurmExecutor writes; not part of its public API

    folder = slurm_folder(cfg)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **parameters)


class TrainingTask(submitit.helpers.Checkpointable):
    """One attempt of a training run. The inherited `checkpoint()` resubmits this same task on timeout or preemption;
    nothing else needs saving because training resumes from its own checkpoints on disk.

    `fresh_start` (`--no-resume`) applies to the first attempt only: a requeued attempt (SLURM_RESTART_COUNT > 0,
    set by Slurm however the requeue came about) resumes, or a requeue would throw away the progress of the run.
    """

    def __init__(self, config_file: Path, fresh_start: bool = False, signal_delay_s: float = 120) -> None:
        self.config_file = config_file
        self.fresh_start = fresh_start
        self.signal_delay_s = signal_delay_s

    def argv(self) -> list[str]:
        fresh = self.fresh_start and int(os.environ.get("SLURM_RESTART_COUNT", "0")) == 0
        return ["--config-file", str(self.config_file)] + (["--no-resume"] if fresh else [])

    def __call__(self) -> None:
        with CheckpointBeforeRequeue(REQUEUE_DEADLINE_SHARE * self.signal_delay_s) as requeue:
            status = run_training(self.argv())
        if requeue.signalled and status != 0:  # the run stopped for the requeue
            if requeue.owed:  # after its checkpoint, in time
                requeue.now()  # rank 0 exits in it; the other ranks return
            return
        if status != 0:  # raised, so that Slurm marks the job FAILED and job.result() raises
            raise RuntimeError(f"training exited with status {status}; see the run's logs/log.txt")


class CheckpointBeforeRequeue:
    """While the block runs, USR2 asks the training loop for a checkpointed stop (dinocell.train.signals) instead of
    calling submitit's handler, which requeues at once. That handler runs through `now()`: at once when no loop
    listens, from a SIGALRM `deadline_s` after the signal when the loop has not stopped by then, else by the caller
    once the run has stopped (`owed`)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: on rank 0, checkpoint() and requeue the job
        self.signalled = self.requeued = False

    @property
    def owed(self) -> bool:
        return self.signalled and not self.requeued

    def now(self, signum: int = signal.SIGUSR2, frame: Any = None) -> None:
        self.requeued = True
        if callable(self.requeue):
            self.requeue(signal.SIGUSR2, frame)

    def _on_usr2(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner or self.signalled:  # a forked child, or the signal again
            return
        self.signalled = True
        if not request_stop("the requeue signal (USR2)"):
            self.now(signum, frame)
            return
        signal.signal(signal.SIGALRM, self.now)
        signal.setitimer(signal.ITIMER_REAL, self.deadline_s)

    def __enter__(self) -> CheckpointBeforeRequeue:
        self.owner = os.getpid()
        self.previous_alarm = signal.getsignal(signal.SIGALRM)
        signal.signal(signal.SIGUSR2, self._on_usr2)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self.previous_alarm)
        signal.signal(signal.SIGUSR2, self.requeue)


def submit(cfg: SSLConfig, parameters: dict[str, Any], *, fresh_start: bool = False,
           max_timeouts: int = MAX_TIMEOUTS) -> submitit.Job:
    """Freeze `cfg` into the run directory and submit its training as one Slurm job; returns submitit's Job.

    `max_timeouts`: how many times a job that reaches its time limit is requeued (preemptions do not count).
    """
    folder = slurm_folder(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    frozen = save_config(cfg, folder / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
    executor.update_parameters(**parameters)
    return executor.submit(TrainingTask(Path(frozen), fresh_start, parameters["signal_delay_s"]))
