"""Training-loop features of both methods, end to end on tiny models: gradient accumulation, validation loss, best
checkpoint and early stopping (with exact resume), SimCLR resume and SimCLR on 2 gloo processes."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_runs import TINY_DINO

from dinocell.config import load_config
from dinocell.data import make_dataset
from dinocell.logging import MetricsLogger
from dinocell.pipeline.transforms import MultiCropTransform
from dinocell.train import train as train_module
from dinocell.train.simclr import SimCLRMetaArch
from dinocell.train.train import train

DINO = [*TINY_DINO, "evaluation.eval_period_iterations=0"]
SIMCLR_RESNET = [
    "method=simclr", "student.arch=resnet18", "student.in_chans=5", "crops.global_crops_size=32",
    "crops.local_crops_number=0", "simclr.head_hidden_dim=32", "simclr.head_out_dim=16",
    "train.dataset_path=SyntheticCellPainting:size=64:image_size=64", "train.batch_size_per_gpu=4",
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3", "optim.warmup_epochs=1",
    "train.log_every=1", "checkpointing.period=3", "evaluation.eval_period_iterations=0",
]
SIMCLR_VIT = [  # BN-free and deterministic: results do not depend on how the batch is split
    "method=simclr", "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1",
    "student.in_chans=5", "student.layerscale=0.1", "student.pos_embed_rope_rescale_coords=null",
    "simclr.head_batchnorm=false", "simclr.head_hidden_dim=32", "simclr.head_out_dim=16",
    *SIMCLR_RESNET[3:],
]
VAL_SET = "SyntheticCellPainting:split=test:size=8:image_size=64:seed=3"


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_gradient_accumulation_equals_one_larger_batch(tmp_path):
    """DINO with EMA centering and no KoLeo (per-image losses; Sinkhorn-Knopp and KoLeo are batch-level): 2 micro-
    batches of 2 images per step give the losses, gradients and teacher of 1 batch of 4 (same images, crops, masks)."""
    exact = ["train.centering=centering", "dino.koleo_loss_weight=0", "student.drop_path_rate=0.0",
             "student.pos_embed_rope_rescale_coords=null", "student.layerscale=0.1"]
    runs = {}
    for name, batch, accum in (("large", 4, 1), ("accumulated", 2, 2)):
        out = tmp_path / name
        cfg = load_config(overrides=[*DINO, *exact, f"train.output_dir={out}", f"train.batch_size_per_gpu={batch}",
                                     f"train.grad_accum_steps={accum}"])
        train(cfg)
        runs[name] = out
    large, accumulated = _metrics(runs["large"]), _metrics(runs["accumulated"])
    assert len(large) == len(accumulated) == 6
    for a, b in zip(large, accumulated):
        for field in ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "grad_norm"):
            assert b[field] == pytest.approx(a[field], rel=1e-4, abs=1e-6), (a["iteration"], field)
        assert b["lr"] == a["lr"]  # the same global batch of 4 sets the lr scaling
    teacher_a = _load(runs["large"] / "eval" / "final" / "teacher_checkpoint.pth")["teacher"]
    teacher_b = _load(runs["accumulated"] / "eval" / "final" / "teacher_checkpoint.pth")["teacher"]
    for key, value in teacher_a.items():
        torch.testing.assert_close(teacher_b[key], value, rtol=1e-4, atol=1e-5, msg=key)
    state = _load(runs["accumulated"] / "ckpt" / "6" / "checkpoint.pth")
    assert state["data"]["global_batch_size"] == 4  # the step's images: the sample stream is that of batch 4


class _ScriptedValidation:
    """Replaces the trainer's Validation: val_loss of iteration `done` from a script, whatever the model."""

    curve: dict[int, float] = {}

    def __init__(self, cfg, model, values, *, device, world_size) -> None:
        self.period = cfg.evaluation.val_period_iterations

    def due(self, done: int, total: int) -> bool:
        self.done = done
        return done % self.period == 0 or done == total

    def __call__(self) -> dict[str, float]:
        return {"val_loss": self.curve[self.done]}


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_best_checkpoint_and_early_stopping_on_a_scripted_curve_survive_a_crash(tmp_path, monkeypatch):
    """val_loss by iteration 5, 4, 4.5, 3, 3.2, 3.1, 3.05, ...: best at 4, and with patience 3 the run stops at 7
    (three validations without improvement) instead of 10. A crash at 5 and a resume give the same run, and running
    the command again after the stop trains no further."""
    _ScriptedValidation.curve = {1: 5.0, 2: 4.0, 3: 4.5, 4: 3.0, 5: 3.2, 6: 3.1, 7: 3.05, 8: 2.0, 9: 1.0, 10: 0.5}
    monkeypatch.setattr(train_module, "Validation", _ScriptedValidation)
    extra = ["optim.epochs=5", "checkpointing.period=2", "checkpointing.max_to_keep=10",
             f"evaluation.val_dataset={VAL_SET}", "evaluation.val_period_iterations=1",
             "train.early_stopping_patience=3"]

    def cfg(out: Path):
        return load_config(overrides=[*DINO, *extra, f"train.output_dir={out}"])

    straight = tmp_path / "straight"
    last = train(cfg(straight))
    records = _metrics(straight)
    assert [r["iteration"] for r in records] == list(range(7)) and last == records[-1]
    assert [r["val_loss"] for r in records] == [5.0, 4.0, 4.5, 3.0, 3.2, 3.1, 3.05]
    assert sorted(p.name for p in (straight / "ckpt").iterdir()) == ["2", "4", "6", "7", "best"]  # 7: the stop
    best = _load(straight / "ckpt" / "best" / "checkpoint.pth")
    at_4 = _load(straight / "ckpt" / "4" / "checkpoint.pth")
    assert best["iteration"] == 4 and best["early_stopping"]["best"] == 3.0
    for key, value in at_4["model"].items():
        assert torch.equal(best["model"][key], value), key
    final = _load(straight / "ckpt" / "7" / "checkpoint.pth")["early_stopping"]
    assert final == {"metric": "val_loss", "best": 3.0, "best_iteration": 4, "reference": 3.0, "bad_validations": 3}
    assert "early stopping at iteration 7" in (straight / "logs" / "log.txt").read_text()
    assert (straight / "eval" / "final" / "teacher_checkpoint.pth").is_file()

    train(cfg(straight))  # the same command again: resumes at 7, already stopped
    assert _metrics(straight) == records and not (straight / "ckpt" / "8").exists()

    real_log = MetricsLogger.log

    def log_then_crash(self, record):
        real_log(self, record)
        if record["iteration"] == 4:  # iteration 5 done; the newest checkpoint is 4
            raise _Interrupt

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(MetricsLogger, "log", log_then_crash)
    with pytest.raises(_Interrupt):
        train(cfg(crashed))
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    train(cfg(crashed))
    resumed = _metrics(crashed)
    losses = ("total_loss", "dino_global_crops_loss", "ibot_loss", "val_loss")
    assert [{k: r[k] for k in losses} for r in resumed] == [{k: r[k] for k in losses} for r in records]
    assert _load(crashed / "ckpt" / "7" / "checkpoint.pth")["early_stopping"] == final
    assert _load(crashed / "ckpt" / "best" / "checkpoint.pth")["iteration"] == 4


@pytest.mark.slow
def test_dino_validation_leaves_training_untouched(tmp_path):
    """DINO with drop path and RoPE augmentation (both draw from the global generator): a run that validates (val_loss
    and k-NN every 2 iterations) trains exactly like one that does not; validation runs in eval mode, so two
    validations of the same weights agree."""
    knn = ["evaluation.knn_train_dataset=SyntheticCellPainting:split=train:size=8:image_size=64:seed=1",
           "evaluation.knn_test_dataset=SyntheticCellPainting:split=test:size=8:image_size=64", "evaluation.knn_k=[3]"]
    random_parts = ["student.drop_path_rate=0.2", "student.pos_embed_rope_rescale_coords=2.0"]
    plain, validated = tmp_path / "plain", tmp_path / "validated"
    train(load_config(overrides=[*DINO, *random_parts, f"train.output_dir={plain}"]))
    validating = [*DINO, *random_parts, *knn, f"evaluation.val_dataset={VAL_SET}", "evaluation.val_period_iterations=2",
                  "checkpointing.best_metric=knn_top1", f"train.output_dir={validated}"]
    train(load_config(overrides=validating))
    a, b = _metrics(plain), _metrics(validated)
    for ra, rb in zip(a, b, strict=True):
        for field in ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"):
            assert ra[field] == rb[field], (ra["iteration"], field)
    scores = [r for r in b if "val_loss" in r]
    assert [r["iteration"] for r in scores] == [1, 3, 5]
    assert all(math.isfinite(r["val_loss"]) and 0 <= r["knn_top1"] <= 100 for r in scores)
    assert json.loads((validated / "eval" / "knn.json").read_text())["final"] == scores[-1]["knn_top1"]
    best = _load(validated / "ckpt" / "best" / "checkpoint.pth")
    assert best["early_stopping"]["metric"] == "knn_top1"
    assert best["early_stopping"]["best"] == max(r["knn_top1"] for r in scores)


def _simclr_val_loss_by_hand(cfg, checkpoint: Path) -> float:
    """val_loss from its definition: the checkpoint's student in eval mode on the two training views of sample i at
    position i, NT-Xent (hand-written, float64) per batch of train.batch_size_per_gpu, averaged over batches."""
    model = SimCLRMetaArch(cfg)
    model.load_state_dict(_load(checkpoint)["model"])
    model.eval()
    dataset = make_dataset(cfg.evaluation.val_dataset)
    transform = MultiCropTransform(cfg.crops, in_chans=cfg.student.in_chans, seed=cfg.train.seed)
    b, losses = cfg.train.batch_size_per_gpu, []
    for start in range(0, len(dataset) - b + 1, b):
        views = [transform(dataset[i], i)["global_crops"] for i in range(start, start + b)]
        with torch.no_grad():
            z1 = model.student(torch.stack([v[0] for v in views])).double()
            z2 = model.student(torch.stack([v[1] for v in views])).double()
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        sim = (z @ z.T / cfg.simclr.temperature).fill_diagonal_(float("-inf"))
        partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        losses.append(float(-(sim[torch.arange(2 * b), partner] - sim.logsumexp(dim=1)).mean()))
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_simclr_resnet_run_resumes_exactly_and_reports_val_loss_by_its_definition(tmp_path, monkeypatch):
    """ResNet-18 SimCLR, 2 micro-batches per step, validation every 3 iterations: 6 iterations in one go == 3, a
    crash, and a resumed run (losses, val_loss, weights, BatchNorm statistics, best checkpoint); val_loss equals the
    loss computed by hand from the checkpoint of that iteration."""
    extra = ["train.grad_accum_steps=2", f"evaluation.val_dataset={VAL_SET}", "evaluation.val_period_iterations=3",
             "evaluation.eval_period_iterations=3"]

    def cfg(out: Path):
        return load_config(overrides=[*SIMCLR_RESNET, *extra, f"train.output_dir={out}"])

    full = tmp_path / "full"
    train(cfg(full))
    records = _metrics(full)
    assert set(records[0]) >= {"total_loss", "nt_xent_loss", "grad_norm", "lr", "wd"}
    assert not {"momentum", "teacher_temp", "last_layer_lr"} & set(records[0])  # no teacher in SimCLR
    assert [r["iteration"] for r in records if "val_loss" in r] == [2, 5]
    for r in records:
        if "val_loss" in r:
            by_hand = _simclr_val_loss_by_hand(cfg(full), full / "ckpt" / str(r["iteration"] + 1) / "checkpoint.pth")
            assert r["val_loss"] == pytest.approx(by_hand, abs=1e-5)
    assert sorted(p.name for p in (full / "eval").iterdir()) == ["3", "6", "final"]
    best_iteration = _load(full / "ckpt" / "best" / "checkpoint.pth")["iteration"]
    assert best_iteration == min((r["val_loss"], r["iteration"] + 1) for r in records if "val_loss" in r)[1]

    real_log = MetricsLogger.log

    def log_then_crash(self, record):
        real_log(self, record)
        if record["iteration"] == 4:
            raise _Interrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_crash)
    with pytest.raises(_Interrupt):
        train(cfg(tmp_path / "resumed"))
    monkeypatch.setattr(MetricsLogger, "log", real_log)
    train(cfg(tmp_path / "resumed"))
    fields = ("total_loss", "nt_xent_loss", "grad_norm", "lr", "wd")
    resumed = _metrics(tmp_path / "resumed")
    assert [{k: r[k] for k in fields} for r in resumed] == [{k: r[k] for k in fields} for r in records]
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in records]
    a = _load(full / "eval" / "final" / "student_checkpoint.pth")["student"]
    b = _load(tmp_path / "resumed" / "eval" / "final" / "student_checkpoint.pth")["student"]
    assert any("running_mean" in k for k in a)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_simclr_two_processes_equal_one_process_with_double_batch(tmp_path):
    """torchrun 2 x batch 2 (gloo, DDP) gives the NT-Xent losses and val_loss of 1 x batch 4: the negatives come from
    the global batch (BN-free model, so nothing else depends on the split)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [*SIMCLR_VIT, f"evaluation.val_dataset={VAL_SET}", "evaluation.val_period_iterations=3"]
    train(load_config(overrides=[*args, f"train.output_dir={tmp_path / 'one'}"]))  # in this process: batch 4
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "dinocell.train", f"--output-dir={tmp_path / 'two'}", *args, "train.batch_size_per_gpu=2"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for field in ("total_loss", "nt_xent_loss", "val_loss"):
            if field in ra:
                assert rb[field] == pytest.approx(ra[field], abs=1e-5), (ra["iteration"], field)
