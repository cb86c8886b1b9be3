"""The training loop: `train(cfg)` runs, or continues, one self-supervised run (method dino or simclr).

Reads top to bottom: pre-flight checks (data, weights, output directory, resume compatibility) -> process group and
output directory -> method, optimiser, schedules -> resume -> metrics and the evaluation at the start -> data -> loop
(one TrainStep per iteration over train.grad_accum_steps micro-batches; validation, best checkpoint and early
stopping; metrics, checkpoints, eval dumps; a SIGTERM stop; periodic evaluations) -> end-of-run work (final eval
dumps, pruning, the start -> end summary of the evaluations), which a rerun redoes when a kill interrupted it.
Everything method-specific is behind the small interface of dinocell.train.methods; the evaluations are
dinocell.train.periodic. The command line around it is dinocell/commands/train.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from dinocell import distributed, parallel
from dinocell.config import SSLConfig, config_to_dict, save_config
from dinocell.data.dataset import SampleDataset
from dinocell.logging import MetricsLogger, setup_logging
from dinocell.logging.sinks import METRICS_FILE
from dinocell.pipeline.loaders import build_ssl_loader_from_config
from dinocell.pipeline.prefetch import DataWaitWatch, DevicePrefetcher
from dinocell.train.checkpoint import BEST, prune_checkpoints, save_checkpoint, save_eval_dump
from dinocell.train.early_stopping import EarlyStopping
from dinocell.train.methods import build_method
from dinocell.train.nonfinite import NonFiniteLossError as NonFiniteLossError  # re-exported: the commands catch it
from dinocell.train.nonfinite import NonFiniteSteps
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.periodic import KNN_HISTORY, PeriodicEvaluation
from dinocell.train.preflight import preflight
from dinocell.train.resume import check_config_change, resume_from_checkpoint, set_aside_run
from dinocell.train.schedules import build_schedules
from dinocell.train.signals import StopRequest
from dinocell.train.state import TrainState, seed_everything
from dinocell.train.step import StepResult, TrainStep
from dinocell.train.validation import Validation

logger = logging.getLogger("dinocell")


def _bad_samples(dataset: SampleDataset) -> int | None:
    """Bad files skipped so far by all ranks and their workers (None for datasets that do not count them)."""
    counts = dataset.bad_sample_counts()
    if counts is None:
        return None
    total = torch.tensor(float(counts["total"]))
    return int(distributed.all_reduce_mean(total) * distributed.get_world_size())


def _record(it: int, values: dict[str, float], step: StepResult, window: dict[str, float], state: TrainState,
            cfg: SSLConfig, global_batch: int) -> dict[str, Any]:
    """The metrics line of iteration `it` (losses averaged over ranks; times averaged over the logging window)."""
    iter_time = window["time"] / window["iters"]
    scheduled = {"wd" if name == "weight_decay" else name: value for name, value in values.items()}
    return {
        "iteration": it,
        "epoch": it / cfg.train.OFFICIAL_EPOCH_LENGTH,
        "iter_time": iter_time,
        "data_time": window["data_time"] / window["iters"],
        "data_wait_share": window["data_time"] / window["time"],
        "images_per_s": global_batch / iter_time,
        **scheduled,  # lr, wd; DINO also last_layer_lr, momentum, teacher_temp
        "total_loss": float(step.loss),
        **{name: float(distributed.all_reduce_mean(value)) for name, value in step.terms.items()},
        "grad_norm": float(step.grad_norm),
        "nonfinite_count": state.nonfinite_count,
    }


def train(cfg: SSLConfig, *, resume: bool = True, stop: StopRequest | None = None) -> dict[str, Any]:
    """Run (or continue) a training run in cfg.train.output_dir; returns the last metrics record. With `stop`
    (dinocell.train.signals), SIGTERM on any rank ends the run at the next iteration, after a checkpoint."""
    dataset = preflight(cfg)  # before anything is built or written
    out = Path(cfg.train.output_dir)
    resume_warnings = check_config_change(cfg, out) if resume else []  # a refused resume changes nothing on disk
    dist_info = distributed.init_distributed(cfg.train.dist_timeout_min)
    device, is_main = dist_info.device, dist_info.is_main
    replaced = set_aside_run(out) if not resume and is_main else None  # --no-resume, before logs/ is reopened
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, enabled=is_main)
    if replaced is not None:
        logger.warning("--no-resume: moved the earlier run's files to %s", replaced)
    for message in resume_warnings:
        logger.warning("%s", message)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    seed_everything(cfg.train.seed)  # identical model initialisation on every rank
    if cfg.train.parallelism == "fsdp":  # before the optimiser: sharding replaces the parameters
        policy = parallel.mixed_precision(device, cfg.compute_precision.autocast_dtype)
        model = parallel.build_sharded(lambda: build_method(cfg), lambda m: m.fsdp_units(), policy, device)
    else:
        model = build_method(cfg).to(device)
    accum = cfg.train.grad_accum_steps
    global_batch = cfg.train.batch_size_per_gpu * dist_info.world_size * accum  # images per optimiser step
    peak_lr = cfg.optim.scaled_lr(global_batch)
    logger.info(
        "method %s; lr %.3g = optim.lr %.3g scaled by %s for global batch %d (%d process(es) x %d x %d accumulation "
        "step(s))", cfg.method, peak_lr, cfg.optim.lr, cfg.optim.scaling_rule, global_batch, dist_info.world_size,
        cfg.train.batch_size_per_gpu, accum,
    )
    schedules = build_schedules(cfg, peak_lr=peak_lr)
    total_iters = len(schedules)
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
        fused=device.type == "cuda",
    )
    early_stopping = EarlyStopping(
        cfg.checkpointing.best_metric, patience=cfg.train.early_stopping_patience,
        min_delta=cfg.train.early_stopping_min_delta,
    )
    state = TrainState(model, optimizer, early_stopping, global_batch_size=global_batch, seed=cfg.train.seed,
                       sharded=cfg.train.parallelism == "fsdp")
    distributed.barrier()
    resumed = resume_from_checkpoint(out / "ckpt", state, total_iters, is_main=is_main) if resume else None
    if resumed is not None:
        logger.info("resumed from %s at iteration %d", resumed, state.iteration)
    if is_main:
        save_config(cfg, out / "config.yaml")  # only now: a failed resume leaves the run's saved config as it was
    step = TrainStep(
        model, optimizer, device=device, clip_grad=cfg.optim.clip_grad,
        autocast_dtype=cfg.compute_precision.autocast_dtype,
    )

    validation = None
    if cfg.evaluation.val_period_iterations > 0:  # at the end-of-training values of the scheduled inputs
        validation = Validation(cfg, model, schedules.at(total_iters - 1), device=device,
                                world_size=dist_info.world_size)

    metrics = MetricsLogger(
        out, total_iterations=total_iters, start_iteration=state.iteration, enabled=is_main,
        logging_cfg=cfg.logging, config=config_to_dict(cfg),
    )
    evaluation = PeriodicEvaluation(cfg, out, device=device, metrics=metrics, total_iterations=total_iters,
                                    start_iteration=state.iteration)
    if state.early_stopping.should_stop:  # a rerun of a run that stopped early ends where it stopped
        evaluation.end_at(state.iteration)
    if evaluation.due(state.iteration):  # the baseline at iteration 0, or the evaluation a resumed run repeats
        evaluation.run(model.eval_backbone(), state.iteration)
    data = DevicePrefetcher(iter(build_ssl_loader_from_config(
        cfg, dataset, rank=dist_info.rank, world_size=dist_info.world_size, start_iter=state.iteration,
        pin_memory=device.type == "cuda",
    )), device)
    data_wait = DataWaitWatch(cfg.train.num_workers, cfg.train.dataset_path, judge=device.type == "cuda",
                              suggest_gpu_augmentations=not cfg.crops.gpu_augmentations)
    state.seed_loop_rng(dist_info.rank, dist_info.world_size, cfg.train.seed)
    model.train()
    nonfinite = NonFiniteSteps(cfg.train.max_consecutive_nonfinite, count=state.nonfinite_count,
                               read_every_step=device.type != "cuda")
    record: dict[str, Any] = {}
    window = {"start": time.perf_counter(), "iters": 0, "data_time": 0.0}
    while state.iteration < total_iters and not state.early_stopping.should_stop:
        it = state.iteration
        t0 = time.perf_counter()
        micro_batches = [next(data) for _ in range(accum)]
        window["data_time"] += time.perf_counter() - t0
        values = schedules.at(it)
        result = step(micro_batches, values)
        state.iteration = done = it + 1
        window["iters"] += 1
        nonfinite.record(result.finite, it)  # kept on the device on CUDA; elsewhere read (and checked) at once

        scores, new_best = {}, False
        if validation is not None and validation.due(done, total_iters):
            t_val = time.perf_counter()
            scores = validation()
            window["start"] += time.perf_counter() - t_val  # iter_time and images_per_s measure training only
            new_best = state.early_stopping.update(scores[cfg.checkpointing.best_metric], done)
        last = done == total_iters or state.early_stopping.should_stop
        # SIGTERM on any rank: all stop here, after a checkpoint. Asking the ranks is a collective and a host read:
        # on CUDA only at metrics lines (within train.log_every iterations), so that a step needs no sync.
        polled = device.type != "cuda" or done % cfg.train.log_every == 0 or last
        stopping = stop is not None and polled and stop.agreed(device)
        checkpoint = done % cfg.checkpointing.period == 0 or last or stopping
        if scores or checkpoint or done % cfg.train.log_every == 0:
            state.nonfinite_count = nonfinite.read()  # the skipped steps' flags since the last read (may stop the run)

        if scores or done % cfg.train.log_every == 0 or last:
            window["time"] = time.perf_counter() - window["start"]
            record = _record(it, values, result, window, state, cfg, global_batch) | scores
            bad_samples = _bad_samples(dataset)
            if bad_samples is not None:
                record["bad_samples"] = bad_samples  # counted since this process started (a resume starts at 0)
            metrics.log(record)
            data_wait.check(record["data_wait_share"])
            window = {"start": time.perf_counter(), "iters": 0, "data_time": 0.0}
        period = cfg.evaluation.eval_period_iterations
        dump = period > 0 and done % period == 0 and not last  # the last one is end-of-run work, below
        if checkpoint or new_best:
            saved = state.state_dict()  # every rank: the RNG states are gathered (and FSDP's shards are written)
            for name in ([done] if checkpoint else []) + ([BEST] if new_best else []):
                save_checkpoint(out / "ckpt", name, saved, cfg.checkpointing.max_to_keep, sharded=state.sharded)
            if new_best:
                logger.info("best %s so far: %.4f at iteration %d, saved in %s", cfg.checkpointing.best_metric,
                            state.early_stopping.best, done, out / "ckpt" / BEST)
        if dump:
            dumped = model.eval_dump()  # every rank: a sharded model is gathered onto rank 0
            if is_main:
                save_eval_dump(out / "eval" / str(done), dumped)
        if checkpoint or new_best or dump:
            distributed.barrier()  # the files are complete before any rank goes on (or a run ends)
        if stopping:
            metrics.close()
            raise stop.stopped()
        if last:
            evaluation.end_at(done)  # total_iters, or where early stopping ends the run
        if evaluation.due(done):
            evaluation.run(model.eval_backbone(), done)
    if state.early_stopping.should_stop and is_main:
        logger.info("early stopping at iteration %d: %s", state.iteration, state.early_stopping.summary())

    # End-of-run work. A rerun after a kill between the last checkpoint and here resumes at the last iteration, runs
    # no iteration and arrives here (having repeated the final evaluation at its start): the eval dumps and the pruning
    # are redone (they are idempotent).
    dumped = model.eval_dump()  # every rank: a sharded model is gathered onto rank 0
    if is_main:
        weights = [save_eval_dump(out / "eval" / name, dumped) for name in (str(state.iteration), "final")][-1]
        prune_checkpoints(out / "ckpt", cfg.checkpointing.max_to_keep)
    evaluation.log_summary()
    metrics.close()
    distributed.barrier()  # ranks leave together: one that left while rank 0 evaluated once aborted a gloo run at exit
    if is_main:
        knn = f"; k-NN {out / 'eval' / KNN_HISTORY}" if cfg.evaluation.knn_enabled else ""
        logger.info("run finished: weights %s; metrics %s%s", weights, out / METRICS_FILE, knn)
    return record
