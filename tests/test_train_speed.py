"""The training step's speed paths on CPU, each against the reference path: the config switches (compile, activation
checkpointing, device augmentations) through the trainer, a step without host reads (the CUDA configuration: fused
AdamW skipping on the device), the exactness of that skip, the batched read of the skip flags, the device prefetcher
and the data-wait metric with its one-time bottleneck warning."""

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import TINY_DINO
from torch.utils._python_dispatch import TorchDispatchMode

from dinocell.config import ConfigError, load_config
from dinocell.data.datasets.synthetic import SyntheticCellPainting
from dinocell.models.vision_transformer import DinoVisionTransformer
from dinocell.pipeline.loaders import build_ssl_loader_from_config
from dinocell.pipeline.prefetch import DataWaitWatch, DevicePrefetcher
from dinocell.train import train as train_module
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.methods import build_method
from dinocell.train.nonfinite import NonFiniteLossError, NonFiniteSteps
from dinocell.train.optim import build_optimizer, param_groups
from dinocell.train.step import TrainStep
from dinocell.train.train import train

TINY = [  # the shared tiny DINO run as 3 iterations of one epoch, with drop path
    *TINY_DINO, "train.OFFICIAL_EPOCH_LENGTH=3", "optim.epochs=1", "optim.warmup_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0", "evaluation.eval_period_iterations=0", "student.drop_path_rate=0.1",
    "student.layerscale=0.1",  # with 1e-5 the cls tokens start almost equal and KoLeo's neighbours flip on 1e-7 noise
]
LOSSES = ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "grad_norm")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


@pytest.mark.parametrize("switch", ["train.compile", "train.activation_checkpointing"])
def test_backbone_switches_need_a_vit(switch):
    simclr_resnet = ["method=simclr", "crops.local_crops_number=0", "student.arch=resnet18"]
    with pytest.raises(ConfigError, match=rf"{switch}=True .*works on ViT blocks; student\.arch=resnet18 has none"):
        load_config(overrides=[*simclr_resnet, f"{switch}=true"])
    with pytest.raises(ConfigError, match=r"crops\.gpu_augmentations=.maybe. .*expected true or false"):
        load_config(overrides=["crops.gpu_augmentations=maybe"])


def test_build_method_applies_the_backbone_switches():
    cfg = load_config(overrides=[*TINY, "train.compile=true", "train.activation_checkpointing=true"])
    model = build_method(cfg)
    student, teacher = model.student.backbone, model.teacher.backbone
    assert student.activation_checkpointing and not teacher.activation_checkpointing  # no gradients to save there
    assert all(block._compiled_call_impl is not None for b in (student, teacher) for block in b.blocks)
    plain = build_method(load_config(overrides=TINY))
    assert not plain.student.backbone.activation_checkpointing
    assert all(block._compiled_call_impl is None for block in plain.student.backbone.blocks)


@pytest.mark.slow
def test_switches_through_the_trainer_match_the_eager_reference(tmp_path, monkeypatch):
    """train.compile (graphs captured by dynamo, run without code generation so the test needs no C++ compiler; the
    inductor path is tests/test_backbone_speed.py's), train.activation_checkpointing and crops.gpu_augmentations
    each train like the default path: the same losses, the same teacher."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile_blocks = DinoVisionTransformer.compile_blocks
    monkeypatch.setattr(DinoVisionTransformer, "compile_blocks",
                        lambda self, **kw: real_compile_blocks(self, backend=counting_backend, **kw))
    torch._dynamo.reset()
    runs = {}
    for name, extra in {"eager": [], "compile": ["train.compile=true"],
                        "checkpointing": ["train.activation_checkpointing=true"],
                        "gpu_augmentations": ["crops.gpu_augmentations=true"]}.items():
        train(load_config(overrides=[*TINY, f"train.output_dir={tmp_path / name}", *extra]))
        runs[name] = _metrics(tmp_path / name)
        if name == "compile":
            assert len(graphs) >= 2  # student (with gradients) and teacher (without) blocks went through dynamo
    torch._dynamo.reset()
    teacher = {}
    for name in runs:
        dump = torch.load(tmp_path / name / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
        teacher[name] = torch.cat([v.flatten() for v in dump.values()])
    for name, records in runs.items():
        assert [r["iteration"] for r in records] == [0, 1, 2]
        for ref, got in zip(runs["eager"], records):
            for key in LOSSES:
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (name, key)
        assert torch.allclose(teacher[name], teacher["eager"], atol=1e-5), name
    # recomputing a block in fp32 repeats the same arithmetic (and drop path's draws): bitwise the same run
    assert all(r[k] == e[k] for r, e in zip(runs["checkpointing"], runs["eager"]) for k in LOSSES)


def _step_setup(overrides: list[str], *, fused: bool):
    """A tiny method, its TrainStep and one loader batch; `fused` = the trainer's CUDA optimiser (fused AdamW)."""
    cfg = load_config(overrides=[*TINY, *overrides])
    torch.manual_seed(0)
    model = build_method(cfg).train()
    groups = param_groups(model.student, n_blocks=model.student.backbone.n_blocks, layerwise_decay=0.9,
                          patch_embed_lr_mult=0.2)
    optimizer = build_optimizer(groups, cfg.optim, fused=fused)
    step = TrainStep(model, optimizer, device=torch.device("cpu"), clip_grad=3.0, autocast_dtype="bf16")
    loader = build_ssl_loader_from_config(cfg, SyntheticCellPainting(size=16, image_size=64), rank=0, world_size=1,
                                          start_iter=0)
    values = {"lr": 1e-3, "last_layer_lr": 1e-3, "weight_decay": 0.04, "teacher_temp": 0.07, "momentum": 0.9}
    return model, optimizer, step, next(iter(loader)), values


class _HostReads(TorchDispatchMode):
    """Records what makes a CUDA host wait for the device: reading a value (item, bool, float, int, tolist:
    aten._local_scalar_dense), outputs shaped by the data (nonzero, masked_select, unique), and tensors made from host
    data for the device (torch.tensor(..., device=...): a blocking host-to-device copy; patched in, since on a CPU it
    copies nothing). scripts/gpu_check.py checks the same step on CUDA with torch.cuda.set_sync_debug_mode."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.calls: list[str] = []
        real_tensor = torch.tensor

        def tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                self.calls.append("torch.tensor(device=...)")
            return real_tensor(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name.startswith(self.SYNCING):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [
    ["crops.gpu_augmentations=true", "crops.noise_probability.local=0.5"],
    ["train.centering=centering", "student.pos_embed_rope_jitter_coords=1.1"],
    ["method=simclr", "crops.local_crops_number=0", "simclr.head_hidden_dim=32"],
], ids=["dino_device_augmentations", "dino_ema_centering", "simclr"])  # fmt: skip
def test_a_step_reads_nothing_back_from_the_device(overrides, monkeypatch):
    """The CUDA configuration (fused AdamW, decision on the device) queues a whole step without one host read; the CPU
    reference configuration (default AdamW) reads the skip flag once, which is how the counter is known to work."""
    model, _, step, batch, values = _step_setup(overrides, fused=True)
    step([batch], values)  # the first step creates the optimiser state
    with (reads := _HostReads(monkeypatch)):
        result = step([batch], values)
    assert reads.calls == [] and result.finite.dtype == torch.bool
    *_, reference_step, batch, values = _step_setup(overrides, fused=False)
    with (reads := _HostReads(monkeypatch)):
        reference_step([batch], values)
    assert "_local_scalar_dense" in reads.calls  # the host decision of the CPU path (free on a CPU)


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    flat = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, state in enumerate(optimizer.state.values()):
        flat |= {f"optim.{i}.{k}": v.clone() for k, v in state.items()}
    return flat


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_the_device_side_skip_changes_nothing(centering, monkeypatch):
    """Fused AdamW with found_inf: a non-finite step leaves parameters, moments, step counts, teacher and EMA centers
    exactly as they were; the next finite step moves all of them."""
    model, optimizer, step, batch, values = _step_setup([f"train.centering={centering}"], fused=True)
    assert step.skips_on_device
    step([batch], values)
    before = _state(model, optimizer)
    real_forward = SSLMetaArch.forward

    def poisoned(self, b, teacher_temp):
        out = real_forward(self, b, teacher_temp)
        return out._replace(loss=out.loss * float("nan"))

    monkeypatch.setattr(SSLMetaArch, "forward", poisoned)
    result = step([batch], values)
    assert not result.finite and torch.isnan(result.loss)
    after = _state(model, optimizer)
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                         after[k])]
    monkeypatch.undo()
    assert step([batch], values).finite
    moved = _state(model, optimizer)
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], moved[k])}
    assert {"student", "teacher", "0"} <= changed  # student, teacher, optimiser state 0 (moments and step count)
    if centering == "centering":
        assert not torch.equal(before["model.dino_center"], moved["model.dino_center"])


def test_skip_flags_are_read_in_batches_with_the_same_count_warnings_and_stop(caplog):
    flags = [True, False, False, True, False, False, True]
    deferred = NonFiniteSteps(3, count=5, read_every_step=False)
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        for it, ok in enumerate(flags):
            deferred.record(torch.tensor(ok), it)
        assert caplog.records == [] and deferred.count == 5  # nothing read yet
        assert deferred.read() == 9  # 4 more skipped steps; never 3 in a row
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"iteration {i}" for i in (1, 2, 4, 5)]
    assert "(2 in a row, 9 in total)" in caplog.records[-1].getMessage()

    for read_every_step in (True, False):
        stop = NonFiniteSteps(3, count=0, read_every_step=read_every_step)
        recorded = 0
        with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row at iteration 4"):
            for it, ok in enumerate([True, True, False, False, False, False, False]):
                stop.record(torch.tensor(ok), it)
                recorded += 1
            stop.read()
        assert recorded == (4 if read_every_step else 7)  # in the record of iteration 4, or at the next read


def test_prefetcher_hands_out_the_loader_batches_on_the_device():
    cfg = load_config(overrides=TINY)
    loader = build_ssl_loader_from_config(cfg, SyntheticCellPainting(size=16, image_size=64), rank=0, world_size=1,
                                          start_iter=0)
    reference, prefetched = iter(loader), DevicePrefetcher(iter(loader), torch.device("cpu"))
    for _ in range(3):
        a, b = next(reference), next(prefetched)
        assert torch.equal(a.global_crops, b.global_crops) and torch.equal(a.mask_indices, b.mask_indices)
    assert DevicePrefetcher(iter(loader), torch.device("cpu")).stream is None  # no side stream off CUDA


def test_bottleneck_warning_once_after_the_first_window_naming_the_knobs(caplog):
    jump = DataWaitWatch(8, "JUMPS3MultiView:bucket=b:crops_per_field=4", judge=True, suggest_gpu_augmentations=True)
    synthetic = DataWaitWatch(2, "SyntheticCellPainting", judge=True, suggest_gpu_augmentations=False)
    on_cpu = DataWaitWatch(2, "SyntheticCellPainting", judge=False, suggest_gpu_augmentations=False)
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        for share in (0.9, 0.05, 0.3, 0.5):  # the first window (start-up) is never judged
            jump.check(share)
        synthetic.check(0.02)
        synthetic.check(0.04)
        for share in (0.9, 0.9, 0.9):
            on_cpu.check(share)  # the workers and the step share the cores: nothing to judge
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "waited for data 30% of the last logging window" in message
    assert "train.num_workers=8" in message and "crops_per_field" in message and "crops.gpu_augmentations" in message
    with caplog.at_level(logging.WARNING, logger="dinocell"):
        for share in (0.5, 0.5):
            synthetic.check(share)
    message = caplog.messages[-1]
    assert "train.num_workers=2" in message and "crops_per_field" not in message and "gpu_augmentations" not in message


class _JudgedWatch(DataWaitWatch):
    """The watch as a CUDA run has it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "judge": True})


@pytest.mark.slow
def test_the_trainer_reports_the_data_wait_share_and_says_when_the_loader_is_slow(tmp_path, monkeypatch):
    """The metric on every line; the warning wired to it (judged as on CUDA here: a CPU run only reports the share)."""
    real = SyntheticCellPainting.__getitem__

    def slow(self, index):
        time.sleep(0.15)  # 4 images per batch: 0.6 s of waiting per iteration, far more than the tiny step
        return real(self, index)

    monkeypatch.setattr(SyntheticCellPainting, "__getitem__", slow)
    for judge in (False, True):
        if judge:
            monkeypatch.setattr(train_module, "DataWaitWatch", _JudgedWatch)
        out = tmp_path / f"judge_{judge}"
        train(load_config(overrides=[*TINY, f"train.output_dir={out}"]))
        records = _metrics(out)
        for r in records:
            assert r["data_wait_share"] == pytest.approx(r["data_time"] / r["iter_time"], rel=1e-9)
        assert all(r["data_wait_share"] > 0.3 for r in records[1:])
        log = (out / "logs" / "log.txt").read_text()
        assert log.count("the data loader is the bottleneck") == int(judge)
    assert "train.num_workers=0" in log
