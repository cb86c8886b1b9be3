"""Validation during training, every `evaluation.val_period_iterations` and at the end: val_loss and knn_top1.

- val_loss: the method's training loss on `evaluation.val_dataset`, with no parameter update. The views are
  deterministic (sample i gets the crops and iBOT masks of position i, the same at every validation) and the model is
  in eval mode (no drop path or RoPE augmentation; BatchNorm uses its running statistics; DINO's teacher is always in
  eval mode). Scheduled inputs take their end-of-training values (DINO: the final teacher temperature), so values are
  comparable across the run. Batches are the training micro-batches (batch x processes; an incomplete last one is
  dropped) and val_loss is their mean. For DINO it is the student-vs-teacher loss, which also moves with the teacher:
  k-NN selects DINO models better.
- knn_top1: weighted k-NN top-1 (%, first k of `evaluation.knn_k`) of the method's eval backbone (DINO's teacher,
  SimCLR's student) from `evaluation.knn_train_dataset` to `knn_test_dataset`, when both are set; the features are
  extracted in shares over the ranks (a sharded model runs on every rank), rank 0 scores and shares the number.

Every process takes part (the losses' collectives, and all must agree on early stopping). Validation draws nothing from
the training's random generators (it runs under fork_rng), so a run with validation trains exactly like one without.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from dinocell import distributed
from dinocell.config import SSLConfig
from dinocell.data import make_dataset
from dinocell.pipeline.loaders import build_eval_transform, build_validation_loader
from dinocell.train.methods import SSLMethod
from dinocell.train.step import autocast_context


def knn_top1(cfg: SSLConfig, backbone: torch.nn.Module, device: torch.device) -> float:
    """k-NN top-1 (%, the first k of evaluation.knn_k) of `backbone`'s cls features: evaluation.knn_train_dataset ->
    knn_test_dataset. Collective: every rank extracts its share of the features; all get the number."""
    from dinocell.eval.features import extract
    from dinocell.eval.knn import knn_classify

    ev, transform = cfg.evaluation, build_eval_transform(cfg)
    feats = [
        extract(backbone, make_dataset(dataset_str), transform, batch_size=cfg.train.batch_size_per_gpu,
                num_workers=cfg.train.num_workers, device=device, distributed_shards=True, show_progress=False)
        for dataset_str in (ev.knn_train_dataset, ev.knn_test_dataset)
    ]
    top1 = None
    if distributed.get_rank() == 0:
        (train_x, train_y), (test_x, test_y) = ((torch.from_numpy(f.matrix()), torch.from_numpy(f.labels))
                                                for f in feats)
        top1 = knn_classify(train_x, train_y, test_x, test_y, k=ev.knn_k[0], temperature=ev.knn_temperature,
                            num_classes=len(feats[0].classes))
    return float(distributed.all_gather_object(top1)[0])


class Validation:
    """`due(done, total)` says when; `validation()` returns {"val_loss": ..., "knn_top1": ...} (those configured)."""

    def __init__(
        self, cfg: SSLConfig, model: SSLMethod, values: Mapping[str, float], *, device: torch.device, world_size: int
    ) -> None:
        """`values`: the scheduled values whose `model.SCHEDULED_INPUTS` the validation forward takes."""
        self.cfg = cfg
        self.model = model
        self.device = device
        self.period = cfg.evaluation.val_period_iterations
        self.inputs = {name: values[name] for name in model.SCHEDULED_INPUTS}
        self.autocast = autocast_context(device, cfg.compute_precision.autocast_dtype)
        self.loader = None
        if cfg.evaluation.val_dataset:
            dataset = make_dataset(cfg.evaluation.val_dataset)
            global_batch = cfg.train.batch_size_per_gpu * world_size
            self.n_batches = len(dataset) // global_batch
            if self.n_batches == 0:
                raise ValueError(
                    f"evaluation.val_dataset={cfg.evaluation.val_dataset!r} has {len(dataset)} samples, fewer than one "
                    f"batch of {global_batch} (train.batch_size_per_gpu x {world_size} processes); use a larger "
                    "validation set"
                )
            self.loader = build_validation_loader(
                cfg, dataset, rank=distributed.get_rank(), world_size=world_size, pin_memory=device.type == "cuda"
            )

    def due(self, done: int, total: int) -> bool:
        return done % self.period == 0 or done == total

    def __call__(self) -> dict[str, float]:
        scores = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.loader is not None:
                scores["val_loss"] = self._loss()
            if self.cfg.evaluation.knn_enabled:
                scores["knn_top1"] = knn_top1(self.cfg, self.model.eval_backbone(), self.device)
        return scores

    @torch.no_grad()
    def _loss(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            total = 0.0
            for batch in itertools.islice(self.loader, self.n_batches):  # a new pass from the first sample
                batch = batch.to(self.device, non_blocking=True).finish_crops()
                with self.autocast():
                    out = self.model(batch, **self.inputs)
                total += float(distributed.all_reduce_mean(out.loss))
        finally:
            self.model.train(was_training)
        return total / self.n_batches
