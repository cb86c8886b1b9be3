"""The training loop: `train(cfg)` runs, or continues, one self-supervised run.

Reads top to bottom: process group and output directory -> model, optimiser, schedules -> resume -> metrics and the
evaluation at the start -> data -> loop (one TrainStep per iteration; metrics, checkpoints, teacher dumps, periodic
evaluations) -> the start -> end summary of the evaluations.
The command line around it is dinocell/commands/train.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from dinocell import distributed
from dinocell.config import SSLConfig, config_to_dict, save_config
from dinocell.data import make_dataset
from dinocell.data.dataset import SampleDataset
from dinocell.logging import MetricsLogger, setup_logging
from dinocell.pipeline.loaders import build_ssl_loader_from_config
from dinocell.train.checkpoint import list_checkpoints, load_latest_checkpoint, save_checkpoint, save_teacher_dump
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.periodic import PeriodicEvaluation
from dinocell.train.schedules import build_schedules
from dinocell.train.state import TrainState, seed_everything
from dinocell.train.step import StepResult, TrainStep

logger = logging.getLogger("dinocell")


class NonFiniteLossError(RuntimeError):
    """Raised after train.max_consecutive_nonfinite non-finite steps in a row."""


def _bad_samples(dataset: SampleDataset) -> int | None:
    """Bad files skipped so far by all ranks and their workers (None for datasets that do not count them)."""
    counts = dataset.bad_sample_counts()
    if counts is None:
        return None
    total = torch.tensor(float(counts["total"]))
    return int(distributed.all_reduce_mean(total) * distributed.get_world_size())


def _set_aside_old_run(out: Path) -> None:
    """--no-resume: move the old run's checkpoints out of the way, so that a later resume cannot pick them up."""
    if list_checkpoints(out / "ckpt"):
        kept = out / f"ckpt.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        (out / "ckpt").rename(kept)
        logger.warning("--no-resume: moved the existing checkpoints to %s", kept)


def _record(it: int, values: dict[str, float], step: StepResult, window: dict[str, float], state: TrainState,
            cfg: SSLConfig, global_batch: int) -> dict[str, Any]:
    """The metrics line of iteration `it` (losses averaged over ranks; times averaged over the logging window)."""
    iter_time = window["time"] / window["iters"]
    return {
        "iteration": it,
        "epoch": it / cfg.train.OFFICIAL_EPOCH_LENGTH,
        "iter_time": iter_time,
        "data_time": window["data_time"] / window["iters"],
        "images_per_s": global_batch / iter_time,
        "lr": values["lr"],
        "last_layer_lr": values["last_layer_lr"],
        "wd": values["weight_decay"],
        "momentum": values["momentum"],
        "teacher_temp": values["teacher_temp"],
        "total_loss": float(step.loss),
        **{name: float(distributed.all_reduce_mean(value)) for name, value in step.terms.items()},
        "grad_norm": float(step.grad_norm),
        "nonfinite_count": state.nonfinite_count,
    }


def train(cfg: SSLConfig, *, resume: bool = True) -> dict[str, Any]:
    """Run (or continue) a training run in cfg.train.output_dir; returns the last metrics record."""
    dist_info = distributed.init_distributed()
    device, is_main = dist_info.device, dist_info.is_main
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, enabled=is_main)
    if is_main:
        save_config(cfg, out / "config.yaml")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    seed_everything(cfg.train.seed)  # identical model initialisation on every rank
    model = SSLMetaArch(cfg).to(device)
    global_batch = cfg.train.batch_size_per_gpu * dist_info.world_size
    peak_lr = cfg.optim.scaled_lr(global_batch)
    logger.info(
        "lr %.3g = optim.lr %.3g scaled by %s for global batch %d (%d process(es) x %d)",
        peak_lr, cfg.optim.lr, cfg.optim.scaling_rule, global_batch, dist_info.world_size, cfg.train.batch_size_per_gpu,
    )
    schedules = build_schedules(cfg, peak_lr=peak_lr)
    total_iters = len(schedules.lr)
    epoch_len = cfg.train.OFFICIAL_EPOCH_LENGTH
    logger.info(
        "an 'epoch' here is train.OFFICIAL_EPOCH_LENGTH = %d iterations (%d images), NOT a pass over the dataset; "
        "training runs optim.epochs = %d epochs = %d iterations",
        epoch_len, epoch_len * global_batch, cfg.optim.epochs, total_iters,
    )
    optimizer = build_optimizer(
        param_groups(
            model.student,
            n_blocks=model.student.backbone.n_blocks,
            layerwise_decay=cfg.optim.layerwise_decay,
            patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        ),
        cfg.optim,
    )
    state = TrainState(model, optimizer, global_batch_size=global_batch, seed=cfg.train.seed)
    if not resume and is_main:
        _set_aside_old_run(out)
    distributed.barrier()
    latest = load_latest_checkpoint(out / "ckpt") if resume else None
    if latest is not None:
        ckpt_dir, saved = latest
        state.load_state_dict(saved)
        logger.info("resumed from %s at iteration %d", ckpt_dir, state.iteration)
    step = TrainStep(
        model, optimizer, device=device, clip_grad=cfg.optim.clip_grad,
        autocast_dtype=cfg.compute_precision.autocast_dtype,
    )

    metrics = MetricsLogger(
        out, total_iterations=total_iters, start_iteration=state.iteration, enabled=is_main,
        logging_cfg=cfg.logging, config=config_to_dict(cfg),
    )
    evaluation = PeriodicEvaluation(cfg, out, device=device, metrics=metrics, total_iterations=total_iters,
                                    start_iteration=state.iteration)
    if evaluation.due(state.iteration):  # the baseline at iteration 0, or the evaluation a resumed run repeats
        evaluation.run(model.teacher.backbone, state.iteration)

    dataset = make_dataset(cfg.train.dataset_path)
    data = iter(build_ssl_loader_from_config(
        cfg, dataset, rank=dist_info.rank, world_size=dist_info.world_size, start_iter=state.iteration,
        pin_memory=device.type == "cuda",
    ))
    state.seed_loop_rng(dist_info.rank, dist_info.world_size, cfg.train.seed)
    model.train()
    consecutive_nonfinite = 0
    record: dict[str, Any] = {}
    window = {"start": time.perf_counter(), "iters": 0, "data_time": 0.0}
    for it in range(state.iteration, total_iters):
        t0 = time.perf_counter()
        batch = next(data).to(device, non_blocking=True)
        window["data_time"] += time.perf_counter() - t0
        values = schedules.at(it)
        result = step(batch, values)
        state.iteration = done = it + 1
        window["iters"] += 1
        if result.finite:
            consecutive_nonfinite = 0
        else:
            state.nonfinite_count += 1
            consecutive_nonfinite += 1
            logger.warning("iteration %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)",
                           it, consecutive_nonfinite, state.nonfinite_count)
            if consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"stopping: {consecutive_nonfinite} non-finite losses in a row at iteration {it} "
                    f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); no checkpoint was "
                    "written from this state. Lower optim.lr, raise the warm-up, or check the data for NaN/inf."
                )

        if done % cfg.train.log_every == 0 or done == total_iters:
            window["time"] = time.perf_counter() - window["start"]
            record = _record(it, values, result, window, state, cfg, global_batch)
            bad_samples = _bad_samples(dataset)
            if bad_samples is not None:
                record["bad_samples"] = bad_samples  # counted since this process started (a resume starts at 0)
            metrics.log(record)
            window = {"start": time.perf_counter(), "iters": 0, "data_time": 0.0}
        checkpoint = done % cfg.checkpointing.period == 0 or done == total_iters
        period = cfg.evaluation.eval_period_iterations
        dump = (period > 0 and done % period == 0) or done == total_iters
        if checkpoint:
            saved = state.state_dict()  # every rank: the RNG states are gathered
            if is_main:
                save_checkpoint(out / "ckpt", done, saved, cfg.checkpointing.max_to_keep)
        if dump and is_main:
            save_teacher_dump(out / "eval" / str(done), model.teacher_state_dict())
            if done == total_iters:
                save_teacher_dump(out / "eval" / "final", model.teacher_state_dict())
        if checkpoint or dump:
            distributed.barrier()  # the files are complete before any rank goes on (or a run ends)
        if evaluation.due(done):
            evaluation.run(model.teacher.backbone, done)

    evaluation.log_summary()
    metrics.close()
    return record
