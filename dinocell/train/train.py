"""The training loop and its command line: `dinocell train --config-file F --output-dir D [--no-resume] key=value ...`.

Reads top to bottom: config -> process group -> model, optimiser, schedules -> resume -> DDP -> data -> loop
(forward, backward with DDP's gradient average, clip, non-finite guard, step, EMA) -> metrics, checkpoints,
eval dumps -> k-NN.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from dinocell import distributed
from dinocell.config import config_to_yaml, load_config, save_config
from dinocell.data import make_dataset
from dinocell.data.loaders import build_eval_transform, build_ssl_loader_from_config
from dinocell.logging import MetricsLogger, setup_logging
from dinocell.train.checkpoint import (
    capture_rng_state,
    list_checkpoints,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_teacher_dump,
)
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.optim import apply_schedule, build_optimizer, param_groups, scaled_lr
from dinocell.train.schedules import build_schedules

logger = logging.getLogger("dinocell")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class NonFiniteLossError(RuntimeError):
    """Raised after train.max_consecutive_nonfinite non-finite steps in a row."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dinocell train",
        description="Self-supervised DINO + iBOT + KoLeo training. Re-running the same command resumes from the "
        "newest complete checkpoint in OUTPUT_DIR/ckpt/. One 'epoch' = train.OFFICIAL_EPOCH_LENGTH iterations.",
    )
    parser.add_argument("--config-file", default=None, help="YAML recipe merged over the default config")
    parser.add_argument("--output-dir", default=None, help="run directory (overrides train.output_dir)")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir is not None:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_config(args.config_file, overrides)
    if args.print_config:
        print(config_to_yaml(cfg))
        return 0
    try:
        train(cfg, resume=not args.no_resume)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return 1
    finally:
        distributed.destroy()
    return 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _data_stream(
    cfg: DictConfig, dataset: torch.utils.data.Dataset, dist_info: distributed.DistInfo, start_iter: int
) -> Iterator[dict[str, Any]]:
    """Collated batches of this rank from global batch `start_iter` on (resuming = skipping, by the sampler)."""
    loader = build_ssl_loader_from_config(
        cfg,
        dataset,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        start_iter=start_iter,
        pin_memory=dist_info.device.type == "cuda",
    )
    return iter(loader)


def _bad_samples(dataset: torch.utils.data.Dataset) -> int | None:
    """Bad files skipped so far by all ranks and their workers (None for datasets that do not count them)."""
    counts = getattr(dataset, "bad_sample_counts", None)
    if counts is None:
        return None
    total = torch.tensor(float(counts()["total"]))
    return int(distributed.all_reduce_mean(total) * distributed.get_world_size())


def knn_top1(cfg: DictConfig, backbone: torch.nn.Module, device: torch.device) -> float:
    """k-NN top-1 (%) of `backbone`'s cls features: evaluation.knn_train_dataset -> evaluation.knn_test_dataset."""
    from dinocell.eval.features import extract_features
    from dinocell.eval.knn import knn_classify

    transform = build_eval_transform(cfg)
    feats = {}
    for split in ("train", "test"):
        dataset = make_dataset(cfg.evaluation[f"knn_{split}_dataset"])
        feats[split] = extract_features(
            backbone, dataset, transform, batch_size=cfg.train.batch_size_per_gpu, num_workers=cfg.train.num_workers,
            device=device,
        )
        num_classes = len(dataset.classes)
    top1 = knn_classify(
        *feats["train"], *feats["test"], k=cfg.evaluation.knn_k, temperature=cfg.evaluation.knn_temperature,
        num_classes=num_classes,
    )
    return float(top1)


def train(cfg: DictConfig, *, resume: bool = True) -> dict[str, Any]:
    """Run (or continue) a training run; returns the last metrics record."""
    dist_info = distributed.init_distributed()
    device = dist_info.device
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, enabled=dist_info.is_main)
    if dist_info.is_main:
        save_config(cfg, out / "config.yaml")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (
        torch.autocast("cuda", dtype=AUTOCAST_DTYPES[cfg.compute_precision.autocast_dtype])
        if device.type == "cuda" and cfg.compute_precision.autocast_dtype != "fp32"
        else contextlib.nullcontext()
    )

    seed_everything(cfg.train.seed)  # identical model initialisation on every rank
    model = SSLMetaArch(cfg).to(device)
    student_params = [p for p in model.student.parameters() if p.requires_grad]
    global_batch = cfg.train.batch_size_per_gpu * dist_info.world_size
    peak_lr = scaled_lr(cfg.optim.lr, global_batch, cfg.optim.scaling_rule)
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
    groups = param_groups(
        model.student,
        n_blocks=model.student.backbone.n_blocks,
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
    )
    optimizer = build_optimizer(groups, cfg)

    start_iter, nonfinite_total, rng_states = 0, 0, None
    if not resume and list_checkpoints(out / "ckpt") and dist_info.is_main:
        # keep the old run's checkpoints out of the way: a later resume must not pick them up
        kept = out / f"ckpt.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        (out / "ckpt").rename(kept)
        logger.warning("--no-resume: moved the existing checkpoints to %s", kept)
    distributed.barrier()
    latest = load_latest_checkpoint(out / "ckpt") if resume else None
    if latest is not None:
        ckpt_dir, state = latest
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_iter, nonfinite_total, rng_states = state["iteration"], state["nonfinite_count"], state["rng"]
        logger.info("resumed from %s at iteration %d", ckpt_dir, start_iter)

    # DDP averages the student's gradients over ranks during backward (bucketed, overlapped with computation);
    # built after resuming so that it starts from the restored weights.
    student: torch.nn.Module = model.student
    if distributed.is_enabled():
        student = DistributedDataParallel(
            model.student,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the backbone's buffers (RoPE periods, k-bias mask) are constants
        )

    knn_enabled = bool(cfg.evaluation.knn_train_dataset and cfg.evaluation.knn_test_dataset)
    knn_path = out / "eval" / "knn.json"
    if knn_enabled and start_iter == 0 and dist_info.is_main:
        knn_path.parent.mkdir(parents=True, exist_ok=True)
        init_top1 = knn_top1(cfg, model.teacher.backbone, device)
        knn_path.write_text(json.dumps({"k": cfg.evaluation.knn_k, "init": init_top1}))
        logger.info("k-NN top-1 at initialisation: %.2f%%", init_top1)

    metrics = MetricsLogger(
        out, total_iterations=total_iters, start_iteration=start_iter, enabled=dist_info.is_main, wandb_cfg=cfg.logging,
        config=OmegaConf.to_container(cfg),
    )
    dataset = make_dataset(cfg.train.dataset_path)
    data = _data_stream(cfg, dataset, dist_info, start_iter)
    # The loop's random stream (drop path, RoPE augmentation) is set only now: creating the loader draws from the
    # global generator, so restoring before it would shift a resumed run's stream by one draw.
    if rng_states is not None and len(rng_states) == dist_info.world_size:
        restore_rng_state(rng_states[dist_info.rank])
    elif rng_states is not None:
        logger.warning("checkpoint holds RNG states of %d ranks, this run has %d: reseeding", len(rng_states),
                       dist_info.world_size)
        seed_everything(cfg.train.seed + dist_info.rank + start_iter)
    else:
        seed_everything(cfg.train.seed + dist_info.rank)
    model.train()
    consecutive_nonfinite = 0
    record: dict[str, Any] = {}
    window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
    for it in range(start_iter, total_iters):
        t0 = time.perf_counter()
        batch = _to_device(next(data), device)
        data_time += time.perf_counter() - t0
        values = schedules.at(it)
        apply_schedule(optimizer, lr=values["lr"], last_layer_lr=values["last_layer_lr"],
                       weight_decay=values["weight_decay"])
        optimizer.zero_grad(set_to_none=True)
        centers = (model.dino_center.clone(), model.ibot_center.clone())

        with autocast:
            loss, terms = model(batch, teacher_temp=values["teacher_temp"], student=student)
        # Backward runs even on a non-finite loss (DDP expects one backward per forward); such a step is skipped below.
        # Gradients are averaged over ranks by then, so every rank sees the same norm and takes the same decision.
        loss.backward()
        max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(student_params, max_norm)
        loss_mean = distributed.all_reduce_mean(loss)
        finite = bool(torch.isfinite(loss_mean)) and bool(torch.isfinite(grad_norm))
        if finite:
            consecutive_nonfinite = 0
            optimizer.step()
            model.update_teacher(values["momentum"])
        else:
            nonfinite_total += 1
            consecutive_nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            model.dino_center.copy_(centers[0])
            model.ibot_center.copy_(centers[1])
            logger.warning("iteration %d: non-finite loss or gradient, step skipped (%d in a row, %d in total)",
                           it, consecutive_nonfinite, nonfinite_total)
            if consecutive_nonfinite >= cfg.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"stopping: {consecutive_nonfinite} non-finite losses in a row at iteration {it} "
                    f"(train.max_consecutive_nonfinite={cfg.train.max_consecutive_nonfinite}); no checkpoint was "
                    "written from this state. Lower optim.lr, raise the warm-up, or check the data for NaN/inf."
                )

        done, window_iters = it + 1, window_iters + 1
        if done % cfg.train.log_every == 0 or done == total_iters:
            iter_time = (time.perf_counter() - window_start) / window_iters
            reduced = {k: float(distributed.all_reduce_mean(v)) for k, v in terms.items()}
            record = {
                "iteration": it,
                "epoch": it / epoch_len,
                "iter_time": iter_time,
                "data_time": data_time / window_iters,
                "images_per_s": global_batch / iter_time,
                "lr": values["lr"],
                "last_layer_lr": values["last_layer_lr"],
                "wd": values["weight_decay"],
                "momentum": values["momentum"],
                "teacher_temp": values["teacher_temp"],
                "total_loss": float(loss_mean),
                **reduced,
                "grad_norm": float(grad_norm),
                "nonfinite_count": nonfinite_total,
            }
            bad_samples = _bad_samples(dataset)
            if bad_samples is not None:
                record["bad_samples"] = bad_samples  # counted since this process started (a resume starts at 0)
            metrics.log(record)
            window_start, window_iters, data_time = time.perf_counter(), 0, 0.0

        if done % cfg.checkpointing.period == 0 or done == total_iters:
            rng = [capture_rng_state()]
            if distributed.is_enabled():
                rng = [None] * dist_info.world_size
                torch.distributed.all_gather_object(rng, capture_rng_state())
            if dist_info.is_main:
                save_checkpoint(
                    out / "ckpt",
                    done,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "iteration": done,
                        "nonfinite_count": nonfinite_total,
                        "rng": rng,
                        # the data stream restarts at global batch `iteration` of this seed and global batch size
                        "sampler": {"start_iter": done, "seed": cfg.train.seed, "global_batch_size": global_batch},
                        "config": config_to_yaml(cfg),
                    },
                    cfg.checkpointing.max_to_keep,
                )
        period = cfg.evaluation.eval_period_iterations
        if dist_info.is_main and ((period > 0 and done % period == 0) or done == total_iters):
            save_teacher_dump(out / "eval" / str(done), model.teacher_state_dict())
            if done == total_iters:
                save_teacher_dump(out / "eval" / "final", model.teacher_state_dict())
        distributed.barrier()

    if knn_enabled and dist_info.is_main:
        result = json.loads(knn_path.read_text()) if knn_path.exists() else {"k": cfg.evaluation.knn_k}
        result["final"] = knn_top1(cfg, model.teacher.backbone, device)
        knn_path.write_text(json.dumps(result))
        init = result.get("init", float("nan"))
        logger.info("k-NN top-1 (k=%d) of the teacher cls features: %.2f%% at initialisation -> %.2f%% trained "
                    "(%+.2f points)", cfg.evaluation.knn_k, init, result["final"], result["final"] - init)
    metrics.close()
    return record
