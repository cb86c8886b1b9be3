"""End-to-end training runs on tiny models: every output, exact resume, non-finite handling, 2-process equivalence."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_runs import TINY_DINO

from dinocell.commands import train as train_command
from dinocell.config import load_config
from dinocell.logging import MetricsLogger
from dinocell.models import build_backbone, load_pretrained
from dinocell.train import checkpoint as ckpt_module
from dinocell.train.meta_arch import SSLMetaArch
from dinocell.train.train import NonFiniteLossError, train

LOSS_FIELDS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "grad_norm",
               "lr", "wd", "momentum", "teacher_temp")


def _cfg(out: Path, *extra: str):
    return load_config(overrides=TINY_DINO + [f"train.output_dir={out}", *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


@pytest.mark.slow
def test_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    last = train(_cfg(out, "student.drop_path_rate=0.1"))
    assert (out / "config.yaml").is_file() and OmegaConf.load(out / "config.yaml").optim.lr == 1e-3  # base lr kept
    log = (out / "logs" / "log.txt").read_text()
    assert "OFFICIAL_EPOCH_LENGTH" in log and "scaled by sqrt_wrt_1024" in log
    assert f"run finished: weights {out / 'eval' / 'final' / 'teacher_checkpoint.pth'}" in log
    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(6)) and records[-1] == last
    for field in (*LOSS_FIELDS, "iteration", "epoch", "iter_time", "data_time", "images_per_s", "last_layer_lr",
                  "nonfinite_count"):
        assert field in last, field
    assert records[0]["last_layer_lr"] == 0.0 and records[-1]["last_layer_lr"] > 0  # frozen for the first epoch
    assert records[-1]["epoch"] == pytest.approx(5 / 2)
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records)

    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["3", "6"]
    state = torch.load(out / "ckpt" / "6" / "checkpoint.pth", weights_only=True)
    assert state["iteration"] == 6 and state["data"] == {"global_batch_size": 4, "seed": 0}
    assert set(state) == {"model", "optimizer", "iteration", "nonfinite_count", "early_stopping", "data", "rng"}
    assert any(k.startswith("teacher.backbone.") for k in state["model"]) and "dino_center" in state["model"]

    assert sorted(p.name for p in (out / "eval").iterdir()) == ["2", "4", "6", "final"]
    dump = torch.load(out / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert {k.split(".")[0] for k in dump} == {"backbone", "dino_head", "ibot_head"}
    backbone = build_backbone("vit_test", patch_size=8, n_storage_tokens=1, in_chans=5)
    load_pretrained(backbone, out / "eval" / "final" / "teacher_checkpoint.pth")
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, dump[f"backbone.{name}"]), name

    train(_cfg(out, "optim.epochs=1"), resume=False)  # --no-resume in the same directory
    replaced = list(out.glob("replaced-*"))  # everything the first run wrote, in one folder
    assert len(replaced) == 1 and sorted(p.name for p in replaced[0].iterdir()) == [
        "ckpt", "config.yaml", "eval", "logs", "training_metrics.json"]
    assert sorted(p.name for p in (replaced[0] / "ckpt").iterdir()) == ["3", "6"]
    assert sorted(p.name for p in (replaced[0] / "eval").iterdir()) == ["2", "4", "6", "final"]
    assert [p.name for p in ckpt_module.list_checkpoints(out / "ckpt")] == ["2"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["2", "final"]
    assert [r["iteration"] for r in _metrics(out)] == [0, 1]
    assert "--no-resume: moved the earlier run's files to" in (out / "logs" / "log.txt").read_text()


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_is_exact(tmp_path, monkeypatch):
    """6 iterations in one go == 3 iterations, a crash, and a resumed run to 6 (RoPE augmentation and drop path on)."""
    extra = ("student.drop_path_rate=0.1", "train.centering=centering")
    train(_cfg(tmp_path / "full", *extra))

    real_log = MetricsLogger.log

    def log_then_crash(self, record):
        real_log(self, record)
        if record["iteration"] == 4:  # one iteration after the checkpoint at 3 (iterations 0-2 done)
            raise _Interrupt

    monkeypatch.setattr(MetricsLogger, "log", log_then_crash)
    with pytest.raises(_Interrupt):
        train(_cfg(tmp_path / "resumed", *extra))
    monkeypatch.undo()
    assert [r["iteration"] for r in _metrics(tmp_path / "resumed")] == [0, 1, 2, 3, 4]
    train(_cfg(tmp_path / "resumed", *extra))  # resumes at iteration 3 and rewrites the lines of 3 and 4

    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["iteration"] for r in resumed] == list(range(6))
    for a, b in zip(full, resumed):
        assert {k: a[k] for k in LOSS_FIELDS} == {k: b[k] for k in LOSS_FIELDS}
    dump_a = torch.load(tmp_path / "full" / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)
    dump_b = torch.load(tmp_path / "resumed" / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)
    for key, value in dump_a["teacher"].items():
        assert torch.equal(value, dump_b["teacher"][key]), key


def _poison(monkeypatch, bad_calls: set[int] | None):
    """Make the meta-arch return a NaN loss on the given forward calls (None: on every call from the 3rd on)."""
    real_forward = SSLMetaArch.forward
    calls = {"n": 0}

    def forward(self, batch, teacher_temp):
        out = real_forward(self, batch, teacher_temp)
        calls["n"] += 1
        bad = calls["n"] >= 3 if bad_calls is None else calls["n"] in bad_calls
        return out._replace(loss=out.loss * float("nan")) if bad else out

    monkeypatch.setattr(SSLMetaArch, "forward", forward)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, {2, 4})
    last = train(_cfg(tmp_path / "run", "train.max_consecutive_nonfinite=2"))
    records = _metrics(tmp_path / "run")
    assert [r["nonfinite_count"] for r in records] == [0, 1, 1, 2, 2, 2] and last["nonfinite_count"] == 2
    assert all(r["grad_norm"] != r["grad_norm"] for r in (records[1], records[3]))  # NaN: the poisoned step's gradients
    state = torch.load(tmp_path / "run" / "ckpt" / "6" / "checkpoint.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_without_poisoned_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, None)
    with pytest.raises(NonFiniteLossError, match="non-finite losses in a row"):
        train(_cfg(tmp_path / "run", "train.max_consecutive_nonfinite=3", "checkpointing.period=1"))
    # iterations 0, 1 were good; 2, 3, 4 were skipped and the run stopped at the third: nothing saved after that
    assert [p.name for p in ckpt_module.list_checkpoints(tmp_path / "run" / "ckpt")][-1] == "4"
    state = torch.load(tmp_path / "run" / "ckpt" / "4" / "checkpoint.pth", weights_only=True)
    good = torch.load(tmp_path / "run" / "ckpt" / "2" / "checkpoint.pth", weights_only=True)
    for key, value in good["model"].items():
        assert torch.equal(value, state["model"][key]), key  # skipped steps leave the model untouched


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(output_dir: Path, *extra: str) -> list[str]:
    """Trainer arguments of the 2-process test: no drop path, no RoPE augmentation (both draw per process).

    LayerScale 0.1 instead of 1e-5: with 1e-5 every image's cls token starts almost identical, KoLeo's nearest-neighbour
    distances are ~1e-5 and fp32 summation-order differences (batch 2 vs 4) are amplified beyond 1e-5.
    """
    no_randomness = ["student.drop_path_rate=0.0", "student.pos_embed_rope_rescale_coords=null"]
    return [f"--output-dir={output_dir}", *TINY_DINO, *no_randomness, "student.layerscale=0.1", *extra]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    """torchrun 2 x batch 2 (gloo, CPU, DDP) gives the losses of 1 x batch 4 (KoLeo over the global batch, Sinkhorn
    too). One masked global crop per global batch: one rank always has no masked patch, yet joins every collective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one_masked = "ibot.mask_sample_probability=0.125"  # int(8 global crops * 0.125) = 1
    one = subprocess.run(
        [sys.executable, "-m", "dinocell.train", *_cli(tmp_path / "one", "train.batch_size_per_gpu=4", one_masked)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "dinocell.train", *_cli(tmp_path / "two", "train.batch_size_per_gpu=2", one_masked)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 6
    for ra, rb in zip(a, b):
        for field in ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss"):
            assert rb[field] == pytest.approx(ra[field], abs=1e-5), (ra["iteration"], field)
        assert rb["images_per_s"] > 0 and rb["lr"] == ra["lr"]  # same global batch -> same scaled lr
    assert all(r["ibot_loss"] > 0 for r in a)


def test_print_config_shows_merged_values_without_training(tmp_path, capsys):
    assert train_command.main(["--output-dir", str(tmp_path / "x"), "--print-config", "optim.lr=0.005"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.optim.lr == 0.005 and printed.train.output_dir == str(tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_reports_nonfinite_stop_and_wandb_offline(tmp_path, monkeypatch):
    """`dinocell train` exits 1 with the message on too many non-finite steps; wandb (offline) gets the records."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _poison(monkeypatch, None)
    out = tmp_path / "run"
    args = ["--output-dir", str(out), *TINY_DINO, "train.max_consecutive_nonfinite=2", "logging.wandb=true"]
    assert train_command.main(args) == 1
    assert "non-finite losses in a row" in (out / "logs" / "log.txt").read_text()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_launcher_help_and_argument_errors():
    launcher = Path(__file__).resolve().parents[1] / "launch_ssl.sh"
    shown = subprocess.run([str(launcher), "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0 and "--no-resume" in shown.stdout and "torchrun" in shown.stdout
    bad = subprocess.run([str(launcher), "not_a_config"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "is not a YAML config file" in bad.stderr
    missing = subprocess.run([str(launcher), "missing.yaml"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# distributed.py: process-group set-up from torchrun's or Slurm's environment; gradients averaged by DDP as in training
DIST_WORKER = """
import torch
from torch.nn.parallel import DistributedDataParallel
from dinocell import distributed



def main():  # a function: the DDP wrapper, which holds the group, is freed before the interpreter shuts down
    info = distributed.init_distributed()
    with distributed.process_group_ends():
        layer = torch.nn.Linear(1, 1, bias=False)
        layer.weight.data.fill_(1.0)
        model = DistributedDataParallel(layer) if distributed.is_enabled() else layer
        model(torch.full((1, 1), float(info.rank + 1))).sum().backward()  # d/dw = rank + 1
        mean = distributed.all_reduce_mean(torch.tensor(float(info.rank)))
        print(info.rank, info.world_size, info.local_rank, layer.weight.grad.item(), float(mean), flush=True)


main()
"""
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_PORT")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {"OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_srun_style_environment_forms_a_group_and_ddp_averages_gradients():
    """Two `srun` tasks (Slurm variables only) join one gloo group; DDP averages their gradients."""
    base = _clean_env() | {"SLURM_NTASKS": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DIST_WORKER], env=base | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    lines = sorted(out.strip() for out, _ in outputs)
    assert lines == [f"{r} 2 {r} 1.5 0.5" for r in range(2)]


def test_single_process_without_launcher_environment():
    command = [sys.executable, "-c", DIST_WORKER]
    out = subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "0 1 0 1.0 0.0"
