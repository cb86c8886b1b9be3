"""Evaluation during training: what the trainer measures on the method's eval backbone (DINO's teacher, SimCLR's
student) at the start, every
`evaluation.eval_period_iterations` iterations and at the end.

Tasks, each on when its dataset string is set (`evaluation.*`):
- k-NN: `knn_train_dataset` -> `knn_test_dataset`, every k of `knn_k` from one neighbour search (dinocell.eval.knn);
- channel consistency of `channel_consistency_dataset` (dinocell.eval.channel_consistency);
- pictures: attention and PCA maps of the first `viz_num_images` samples of `viz_dataset` (a fixed set).

Schedule: after 0, P, 2P, ... iterations and after the last one (P = eval_period_iterations; 0 = start and end
only). A resumed run evaluates at its start iteration when that is on the schedule: the metric sinks dropped
everything from the resume point on, so the evaluation there is written again rather than lost.

Outputs, for iteration D (iterations done):
- `eval/D/knn.json|txt` and `eval/D/channel-consistency.json|txt`, as `dinocell eval knn|channel-consistency`
  write them; `eval/D/attention/` and `eval/D/pca/`, as `dinocell viz attention|pca` write them;
- one record {"iteration": D, "eval/...": number} to the metric sinks (`eval/metrics.json`, wandb, TensorBoard,
  trackio) and the pictures as images (`eval/attention/<sample id>`, `eval/pca`);
- `eval/knn.json`: top-1 % of every k at every evaluated iteration, with "init" and "final" for the first k;
- a summary line in the log.

Every rank calls `run`: features are extracted in shares over the ranks and gathered (no rank waits alone in a
collective while another extracts everything). Rank 0 scores, writes and logs, and draws the few pictures. The
generator states are restored afterwards, so training does not depend on whether, or how often, it evaluates.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinocell import distributed
from dinocell.config import ConfigError, SSLConfig
from dinocell.data import make_dataset
from dinocell.eval.channel_consistency import channel_consistency, consistency_table
from dinocell.eval.features import extract
from dinocell.eval.knn import knn_evaluate, knn_table
from dinocell.eval.model_pictures import attention_pictures, pca_pictures, sample_views, write_attention_pictures
from dinocell.eval.pca_maps import write_pca
from dinocell.eval.render import safe_stem
from dinocell.eval.report import write_results
from dinocell.logging import MetricsLogger
from dinocell.pipeline.loaders import build_eval_transform
from dinocell.train.checkpoint import capture_rng_state, restore_rng_state

logger = logging.getLogger("dinocell")
KNN_HISTORY = "knn.json"


class PeriodicEvaluation:
    """`run(backbone, iteration)` when `due(iteration)`; `end_at(iteration)` when the run ends early; `log_summary()`
    at the end of training."""

    def __init__(
        self, cfg: SSLConfig, output_dir: Path, *, device: torch.device, metrics: MetricsLogger,
        total_iterations: int, start_iteration: int,
    ) -> None:
        self.cfg, self.ev = cfg, cfg.evaluation
        self.eval_dir = Path(output_dir) / "eval"
        self.device, self.metrics, self.total = device, metrics, total_iterations
        self.is_main = distributed.get_rank() == 0
        self.transform = build_eval_transform(cfg)
        # datasets are built once, now, so that a dataset that cannot be opened stops the run at its start
        self.knn_sets = None
        if self.ev.knn_enabled:
            self.knn_sets = {"train": make_dataset(self.ev.knn_train_dataset),
                             "test": make_dataset(self.ev.knn_test_dataset)}
            for split, dataset in self.knn_sets.items():
                if not dataset.classes:
                    raise ConfigError(f"evaluation.knn_{split}_dataset={getattr(self.ev, f'knn_{split}_dataset')!r} "
                                     "has no class labels; k-NN needs a labelled dataset")
        self.channel_set = make_dataset(self.ev.channel_consistency_dataset) \
            if self.ev.channel_consistency_dataset else None
        self.viz_samples: list[dict] = []
        if self.ev.viz_dataset and importlib.util.find_spec("matplotlib") is None:
            raise ConfigError(f"evaluation.viz_dataset={self.ev.viz_dataset!r}: the attention maps need matplotlib "
                              "(pip install 'dinocell[viz]'), or set evaluation.viz_dataset=''")
        if self.ev.viz_dataset and self.is_main:
            dataset = make_dataset(self.ev.viz_dataset)
            self.viz_samples = [dataset[i] for i in range(min(self.ev.viz_num_images, len(dataset)))]
        self.enabled = bool(self.knn_sets) or self.channel_set is not None or bool(self.ev.viz_dataset)
        if self.is_main and self.knn_sets:
            self._trim_knn_history(start_iteration)

    def end_at(self, iteration: int) -> None:
        """The run ends after `iteration` iterations (early stopping ends it before the schedule's last one): the
        evaluation there is the final one."""
        self.total = iteration

    def due(self, iteration: int) -> bool:
        period = self.ev.eval_period_iterations
        on_schedule = iteration in (0, self.total) or (period > 0 and iteration % period == 0)
        return self.enabled and on_schedule

    def run(self, backbone: nn.Module, iteration: int) -> None:
        """Evaluate `backbone` (the method's eval_backbone) after `iteration` iterations. Collective: every rank calls
        it."""
        rng = capture_rng_state()
        out_dir = self.eval_dir / str(iteration)
        record: dict[str, Any] = {"iteration": iteration}
        try:
            if self.knn_sets:
                record.update(self._knn(backbone, out_dir, iteration))
            if self.channel_set is not None:
                record.update(self._channel_consistency(backbone, out_dir))
            if self.viz_samples:
                self._pictures(backbone, out_dir, iteration)
        finally:
            restore_rng_state(rng)
        if self.is_main:
            self.metrics.log_eval(record)
            logger.info("eval after %d iterations: %s", iteration, self._summary(record, out_dir))

    def _summary(self, record: dict[str, Any], out_dir: Path) -> str:
        parts = []
        if self.knn_sets:
            ks = " ".join(f"k={k} {100 * record[f'eval/knn_k{k}_top1']:.2f}%" for k in self.ev.knn_k)
            parts.append(f"k-NN top-1 {ks}")
        if self.channel_set is not None:
            parts.append(f"channel consistency: cosine to mean {record['eval/channel_cosine_to_mean']:.4f}, "
                         f"retrieval top-1 {100 * record['eval/channel_retrieval_top1']:.2f}%")
        if self.viz_samples:
            parts.append(f"attention and PCA maps in {out_dir}")
        return "; ".join(parts)

    def _knn(self, backbone: nn.Module, out_dir: Path, iteration: int) -> dict[str, float]:
        train_cfg = self.cfg.train
        feats = {split: extract(backbone, dataset, self.transform, batch_size=train_cfg.batch_size_per_gpu,
                                num_workers=train_cfg.num_workers, device=self.device, distributed_shards=True)
                 for split, dataset in self.knn_sets.items()}
        if not self.is_main:
            return {}
        train, test = feats["train"], feats["test"]
        scores = knn_evaluate(
            torch.from_numpy(train.matrix()).to(self.device), torch.from_numpy(train.labels),
            torch.from_numpy(test.matrix()).to(self.device), torch.from_numpy(test.labels), ks=self.ev.knn_k,
            temperature=self.ev.knn_temperature, num_classes=len(train.classes), class_names=train.classes,
        )
        results = {
            "k": scores, "temperature": self.ev.knn_temperature, "features": "cls", "num_classes": len(train.classes),
            "n_train": len(train), "n_test": len(test),
            "bad_samples_skipped": {"train": len(train.skipped), "test": len(test.skipped)},
            "inputs": {"train": f"dataset {self.ev.knn_train_dataset}", "test": f"dataset {self.ev.knn_test_dataset}"},
            "iteration": iteration,
        }
        write_results(out_dir, "knn", results, knn_table(results))
        self._update_knn_history(iteration, {k: 100.0 * m["accuracy"] for k, m in scores.items()})
        record = {}
        for k, metrics in scores.items():
            for name in ("accuracy", "top5", "balanced_accuracy", "macro_f1"):
                if name in metrics:
                    record[f"eval/knn_k{k}_{'top1' if name == 'accuracy' else name}"] = metrics[name]
        return record

    def _channel_consistency(self, backbone: nn.Module, out_dir: Path) -> dict[str, float]:
        crops = self.cfg.crops
        results = channel_consistency(
            backbone, self.channel_set, size=crops.global_crops_size, in_chans=self.cfg.student.in_chans,
            channel_mean=crops.channel_mean, channel_std=crops.channel_std,
            batch_size=self.cfg.train.batch_size_per_gpu, num_workers=self.cfg.train.num_workers, device=self.device,
            distributed_shards=True,
        )
        if not self.is_main:
            return {}
        results["dataset"] = self.ev.channel_consistency_dataset
        write_results(out_dir, "channel-consistency", results, consistency_table(results))
        record = {f"eval/channel_{name}": value for name, value in results["channel_average"].items()}
        for view, scores in results["views"].items():
            record.update({f"eval/channel_{view}_{name}": value for name, value in scores.items()})
        return record

    def _pictures(self, backbone: nn.Module, out_dir: Path, iteration: int) -> None:
        """Attention and PCA maps of the fixed samples (rank 0 only: a few images)."""
        views = sample_views(self.viz_samples, self.transform)
        attention = attention_pictures(backbone, views, self.device)
        write_attention_pictures(attention, views, out_dir / "attention")
        pairs, grid = pca_pictures(backbone, views, self.device)
        write_pca(pairs, grid, out_dir / "pca", views.ids)
        images = {f"eval/attention/{safe_stem(i)}": figure.heads for i, figure in zip(views.ids, attention)}
        self.metrics.log_images({**images, "eval/pca": grid}, step=iteration)

    # ---------------------------------------------------------------------------------------- eval/knn.json
    def _read_knn_history(self) -> dict[str, Any]:
        path = self.eval_dir / KNN_HISTORY
        if not path.is_file():
            return {}
        history = json.loads(path.read_text())
        if "top1" not in history and "init" in history:  # written by dinocell 0.1: {"k", "init", "final"}
            history["top1"] = {"0": {str(history["k"]): history["init"]}}
        return history

    def _trim_knn_history(self, start_iteration: int) -> None:
        """A resumed run evaluates again from its start iteration on: earlier entries stay, later ones go."""
        history = self._read_knn_history()
        top1 = {it: v for it, v in history.get("top1", {}).items() if int(it) < start_iteration}
        self._write_knn_history(top1)

    def _update_knn_history(self, iteration: int, top1: dict[int, float]) -> None:
        history = self._read_knn_history().get("top1", {})
        history[str(iteration)] = {str(k): v for k, v in top1.items()}
        self._write_knn_history(history)

    def _write_knn_history(self, top1: dict[str, dict[str, float]]) -> None:
        """{"k": first k, "init": its top-1 % at iteration 0, "final": at the end, "ks", "temperature",
        "top1": {iteration: {k: top-1 %}}} (the first three as dinocell 0.1 wrote them)."""
        k = str(self.ev.knn_k[0])
        history: dict[str, Any] = {"k": self.ev.knn_k[0], "ks": list(self.ev.knn_k),
                                   "temperature": self.ev.knn_temperature}
        for name, iteration in (("init", "0"), ("final", str(self.total))):
            if k in top1.get(iteration, {}):
                history[name] = top1[iteration][k]
        history["top1"] = dict(sorted(top1.items(), key=lambda item: int(item[0])))
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.eval_dir / f".{KNN_HISTORY}.tmp"
        tmp.write_text(json.dumps(history, indent=1) + "\n")
        tmp.replace(self.eval_dir / KNN_HISTORY)

    def log_summary(self) -> None:
        """The start -> end lines of the run (rank 0): channel consistency, then k-NN (the demo's last line)."""
        if not self.is_main:
            return
        start, end = (self.eval_dir / "0" / "channel-consistency.json", self.eval_dir / str(self.total) /
                      "channel-consistency.json")
        if self.channel_set is not None and start.is_file() and end.is_file():
            first, last = (json.loads(p.read_text())["channel_average"] for p in (start, end))
            logger.info(
                "channel consistency (single channels vs their mean): cosine %.4f -> %.4f, retrieval "
                "top-1 %.2f%% -> %.2f%% (chance %.2f%%)", first["cosine_to_mean"], last["cosine_to_mean"],
                100 * first["retrieval_top1"], 100 * last["retrieval_top1"],
                100 * json.loads(end.read_text())["chance_top1"],
            )
        history = self._read_knn_history()
        if self.knn_sets and "final" in history:
            init = history.get("init", float("nan"))
            logger.info("k-NN top-1 (k=%d) of the %s features: %.2f%% at initialisation -> %.2f%% trained "
                        "(%+.2f points)", history["k"], "teacher cls" if self.cfg.method == "dino" else "backbone",
                        init, history["final"], history["final"] - init)
