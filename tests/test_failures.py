"""The failure path: each user mistake is a short message and a non-zero exit, checked before anything is written; a
refused, failed or interrupted resume never damages a run; Ctrl-C and SIGTERM say how to resume; a kill after the last
checkpoint is repaired by a rerun.

The CLI runs in a subprocess where the boundary must be proven end to end (exit code, stderr, files), in-process
where a subprocess would only add start-up time.
"""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from tiny_runs import TINY_DINO

from dinocell.commands import train as train_command
from dinocell.commands.boundary import command
from dinocell.config import ConfigError, load_config
from dinocell.data.dataset import DatasetError
from dinocell.data.io.bad_files import BadFileError, BadSampleTracker
from dinocell.errors import UserError, user_message
from dinocell.models import build_backbone
from dinocell.models.pretrained import WeightsError
from dinocell.train.checkpoint import UnreadableCheckpointsError, list_checkpoints
from dinocell.train.resume import ResumeError
from dinocell.train.train import train

ROOT = Path(__file__).resolve().parents[1]
LOSS_FIELDS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "grad_norm")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cfg(out: Path, *extra: str):
    return load_config(overrides=[*TINY_DINO, f"train.output_dir={out}", *extra])


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinocell.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cells(root: Path, channels: int = 3) -> Path:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for k in range(3):
            pixels = np.arange(20 * 20 * channels, dtype=np.uint16).reshape(20, 20, channels) + k
            tifffile.imwrite(root / label / f"{k}.tif", pixels, photometric="minisblack")
    return root


# -- the boundary, end to end -----------------------------------------------------------------------------------------

def test_no_command_version_and_close_command():
    bare = _cli()
    assert bare.returncode == 2 and bare.stdout == "" and "usage: dinocell" in bare.stderr
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == "dinocell 0.1.0"
    typo = _cli("trian")
    assert typo.returncode == 2 and "unknown command 'trian'. Did you mean 'train'?" in typo.stderr


@pytest.mark.parametrize(("in_subprocess", "write", "args", "phrase"), [
    (True, {"bad.yaml": "optim:\n  lr: [1\n"}, ["--config-file", "bad.yaml"],
     "config file '{tmp}/bad.yaml' is not valid YAML"),
    (True, {}, ["train.dataset_path=SingleCellFolder:root={tmp}/none"], "root '{tmp}/none' is not a directory"),
    (False, {}, ["--config-file", "missing.yaml"], "config file '{tmp}/missing.yaml' does not exist"),
    (False, {}, ["optim.epochs=abc"], "optim.epochs='abc' (set in the command line): expected an integer"),
    (False, {}, ["optim.epcohs=3"], "unknown config key 'optim.epcohs' in the command line. Did you mean "
                                    "'optim.epochs'?"),
    (False, {}, ["train.dataset_path=SingleCellFolder:rot=x"], "SingleCellFolder has no key 'rot'. Did you mean "
                                                               "'root'?"),
    (False, {"afile": ""}, ["--output-dir", "afile/run"], "{tmp}/afile is a file, not a folder; choose another "
                                                           "--output-dir"),
    (False, {}, ["train.dataset_path=JUMPS3MultiView:bucket=b:endpoint_url=http://127.0.0.1:9:retries=0"],
     "cannot list s3://b/cpg0016-jump/ at S3 endpoint http://127.0.0.1:9 (1 attempt, last: EndpointConnectionError"),
])  # fmt: skip
def test_train_mistakes_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, in_subprocess, write, args,
                                                       phrase):
    """`python -m dinocell.train` (what torchrun and launch_ssl.sh run) end to end for two, in-process for the rest."""
    for name, text in write.items():
        (tmp_path / name).write_text(text)
    args = ["--output-dir", str(tmp_path / "run"), *TINY_DINO, *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    before = sorted(p.name for p in tmp_path.iterdir())
    if in_subprocess:
        run = subprocess.run([sys.executable, "-m", "dinocell.train", *args], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
        code, err = run.returncode, run.stderr
    else:
        monkeypatch.chdir(tmp_path)
        code, err = train_command.main(args), capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("dinocell train: ") and len(err.splitlines()) == 1, err
    assert phrase.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, no log


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch, capsys):
    shown = _cli("--debug", "train", f"--output-dir={tmp_path}", "optim.epochs=abc")
    assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
    assert "ConfigError: optim.epochs='abc'" in shown.stderr
    from dinocell.commands import datasets

    with pytest.raises(DatasetError, match="unknown dataset 'Synth'"):
        datasets.main(["Synth", "--debug"])
    monkeypatch.setenv("DINOCELL_DEBUG", "1")
    with pytest.raises(DatasetError):
        datasets.main(["Synth"])
    monkeypatch.delenv("DINOCELL_DEBUG")
    assert datasets.main(["Synth"]) == 2 and capsys.readouterr().err.startswith("dinocell datasets: unknown")

    @command("dinocell demo")
    def buggy(argv):
        return {}["missing"]

    with pytest.raises(KeyError):  # not a user error: the traceback is the report
        buggy([])

    @command("dinocell demo")
    def disk_full(argv):
        raise OSError(errno.ENOSPC, "No space left on device", "/scratch/run/ckpt")

    assert disk_full([]) == 2
    assert capsys.readouterr().err == "dinocell demo: No space left on device: /scratch/run/ckpt\n"
    with pytest.raises(OSError):
        disk_full(["--debug"])


def test_every_command_is_behind_the_boundary_and_takes_debug():
    import argparse
    import importlib

    from dinocell.cli import COMMANDS
    from dinocell.commands.eval import TASKS

    for module_name, _ in [*COMMANDS.values(), *TASKS.values()]:
        if module_name == "dinocell.commands.eval":
            continue  # only dispatches to the tasks below
        module = importlib.import_module(module_name)
        assert hasattr(module.main, "__wrapped__"), f"{module_name}.main lacks @command"
        parsers = [module.build_parser()]
        for action in parsers[0]._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers = list(action.choices.values())
        assert all("--debug" in parser.format_help() for parser in parsers), module_name


def test_overrides_anywhere_on_the_line(tmp_path, capsys):
    recipe = ROOT / "configs" / "train" / "demo.yaml"
    assert train_command.main(["--config-file", str(recipe), "optim.lr=0.004", "--print-config", "optim.epochs=7",
                               "--output-dir", str(tmp_path / "x")]) == 0
    shown = capsys.readouterr().out
    assert "  lr: 0.004\n" in shown and "  epochs: 7\n" in shown and not (tmp_path / "x").exists()
    launcher = subprocess.run([str(ROOT / "launch_ssl.sh"), str(recipe), "a.b=1", "--no-resume", "c.d=2", "--dry-run"],
                              capture_output=True, text=True, timeout=30)
    assert launcher.returncode == 0 and launcher.stdout.split()[-3:] == ["a.b=1", "--no-resume", "c.d=2"]


def test_a_data_loading_worker_error_is_reduced_to_its_message():
    wrapped = ("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n'
               "dinocell.data.dataset.DatasetError: 8 samples in a row could not be reached")
    assert user_message(DatasetError(wrapped)) == ("8 samples in a row could not be reached (in a data-loading "
                                                   "worker)")


# -- pre-flight: found before the model is built and before anything is written ---------------------------------------

@pytest.mark.parametrize(("extra", "error", "phrase"), [
    (["student.in_chans=5"], DatasetError, "crops.channel_views.global1=all gives 3 channels but student.in_chans=5: "
                                           "set student.in_chans=3"),
    (["train.dataset_path=SingleCellFolder:root={cells}:channels=0,1,7"], DatasetError,
     "no loadable sample among 6 consecutive samples from index 0 (last error: bad_shape: "),
    (["crops.channel_mean=[0.5]", "crops.channel_std=[1.0]"], DatasetError, "crops.channel_mean has 1 values"),
    (["evaluation.knn_train_dataset=ImageFolder:root={cells}/none",
      "evaluation.knn_test_dataset=SyntheticCellPainting"],
     DatasetError, "evaluation.knn_train_dataset='ImageFolder:root={cells}/none': ImageFolder: root"),
    (["student.pretrained_weights={weights}"], WeightsError, "another architecture than the backbone (embed dim 192"),
])  # fmt: skip
def test_preflight_stops_before_the_model_and_the_output_dir(tmp_path, extra, error, phrase, caplog):
    cells = _cells(tmp_path / "cells")
    weights = tmp_path / "vit_tiny.pth"
    torch.save(build_backbone("vit_tiny", patch_size=8, in_chans=3, n_storage_tokens=1).state_dict(), weights)
    fill = {"{cells}": str(cells), "{weights}": str(weights)}
    for key, value in fill.items():
        extra = [e.replace(key, value) for e in extra]
        phrase = phrase.replace(key, value)
    out = tmp_path / "run"
    cfg = _cfg(out, f"train.dataset_path=SingleCellFolder:root={cells}", "student.in_chans=3", *extra)
    with caplog.at_level(logging.WARNING, logger="dinocell.data"), pytest.raises(error) as info:
        train(cfg)
    assert phrase in str(info.value)
    assert not out.exists()
    assert "bad sample" not in caplog.text  # one message, not a warning per file before it


def test_consecutive_unreachable_samples_stop_with_the_reason():
    tracker = BadSampleTracker(100)
    calls = []

    def outage(index):
        calls.append(index)
        raise BadFileError("unreachable", f"s3://b/{index}", "6 attempts, last: EndpointConnectionError")

    with pytest.raises(DatasetError, match="8 samples in a row could not be reached .*check the endpoint"):
        tracker.first_good(0, outage)
    assert calls == list(range(8))

    def every_other_missing(index):  # ordinary bad files: skipped, the run goes on
        if index % 2 == 0:
            raise BadFileError("missing" if index % 4 else "unreachable", f"f{index}")
        return index

    assert BadSampleTracker(100).first_good(0, every_other_missing) == (1, 1)


# -- resume safety ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run (6 iterations, checkpoints 3 and 6) that tests copy before they touch it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(_cfg(out))
    return out


def _copy(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(run), str(to)], check=True)
    return to


def test_incompatible_resume_is_refused_and_changes_nothing(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    before = _snapshot(out)
    run = subprocess.run([sys.executable, "-m", "dinocell.train", f"--output-dir={out}", *TINY_DINO,
                          "dino.head_n_prototypes=128", "student.patch_size=16"],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, run.stderr
    assert ("its checkpoints hold another model (dino.head_n_prototypes 64 -> 128; student.patch_size 8 -> 16)"
            in run.stderr)
    assert "another --output-dir, or --no-resume" in run.stderr
    assert _snapshot(out) == before  # config.yaml byte-identical, nothing written


def test_schedule_changes_are_warned_and_a_finished_run_is_extended(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    train(_cfg(out, "optim.epochs=4", "train.log_every=2"))
    log = (out / "logs" / "log.txt").read_text()
    assert "resuming with changed schedule or data settings: optim.epochs 3 -> 4" in log
    assert "resuming with other changed settings: train.log_every 1 -> 2" in log
    assert "resumed from" in log and [p.name for p in list_checkpoints(out / "ckpt")] == ["3", "6", "8"]
    assert load_config(out / "config.yaml").optim.epochs == 4  # saved once the resume worked


def test_unreadable_checkpoints_stop_the_run_and_stay(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    for ckpt in list_checkpoints(out / "ckpt"):
        data = (ckpt / "checkpoint.pth").read_bytes()
        (ckpt / "checkpoint.pth").write_bytes(data[: len(data) // 2])  # truncated
    before = _snapshot(out)
    with pytest.raises(UnreadableCheckpointsError, match=r"no checkpoint in .*ckpt can be read: 6 \(.*\); 3 \("):
        train(_cfg(out, "optim.epochs=5"))
    after = _snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith("logs/")} == {
        k: v for k, v in before.items() if not k.startswith("logs/")}  # checkpoints and config.yaml untouched


def test_an_unreadable_newest_checkpoint_is_set_aside_not_pruned_over(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    (out / "ckpt" / "6" / "checkpoint.pth").write_bytes(b"garbage")
    train(_cfg(out, "checkpointing.max_to_keep=1"))  # resumes from 3, saves 6 again and keeps only it
    assert [p.name for p in list_checkpoints(out / "ckpt")] == ["6"]
    assert len(list((out / "ckpt").glob("6.unreadable-*"))) == 1
    assert torch.load(out / "ckpt" / "6" / "checkpoint.pth", weights_only=True)["iteration"] == 6


def test_a_resume_beyond_the_end_and_a_mismatched_checkpoint_are_refused(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    with pytest.raises(ResumeError, match="at iteration 6, beyond the 4 iterations of this config"):
        train(_cfg(out, "optim.epochs=2"))
    (out / "config.yaml").unlink()  # no saved config to compare: the checkpoint itself refuses
    with pytest.raises(ResumeError, match="does not fit the model of this config .*size mismatch"):
        train(_cfg(out, "dino.head_n_prototypes=32"))
    assert not (out / "config.yaml").exists()


KILL_AFTER_LAST_CHECKPOINT = """
import os, signal, sys
from dinocell.train import train as loop
from dinocell.train.checkpoint import CHECKPOINT_FILE, atomic_save

real_save = loop.save_checkpoint

def save_then_die(root, iteration, state, max_to_keep, **kwargs):
    if iteration < 6:
        return real_save(root, iteration, state, max_to_keep, **kwargs)
    atomic_save(state, root / str(iteration), CHECKPOINT_FILE)  # complete, but neither pruned nor dumped
    os.kill(os.getpid(), signal.SIGKILL)

loop.save_checkpoint = save_then_die
from dinocell.commands.train import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_kill_after_the_last_checkpoint_is_finished_by_a_rerun(tmp_path):
    out = tmp_path / "run"
    knn = ["evaluation.knn_train_dataset=SyntheticCellPainting:split=train:size=24:image_size=32:seed=1",
           "evaluation.knn_test_dataset=SyntheticCellPainting:split=test:size=16:image_size=32", "evaluation.knn_k=[5]"]
    extra = ["checkpointing.period=2", "checkpointing.max_to_keep=2", "evaluation.eval_period_iterations=4", *knn]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_LAST_CHECKPOINT, f"--output-dir={out}", *TINY_DINO,
                             *extra], env=ENV, capture_output=True, text=True, timeout=180)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out / "ckpt")] == ["2", "4", "6"]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["0", "4", "knn.json", "metrics.json"]
    assert "final" not in json.loads((out / "eval" / "knn.json").read_text())

    train(_cfg(out, *extra))  # resumes at the last iteration: no step, only the end-of-run work
    assert [p.name for p in list_checkpoints(out / "ckpt")] == ["4", "6"]  # pruned to max_to_keep
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["0", "4", "6", "final", "knn.json", "metrics.json"]
    teacher = torch.load(out / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    model = torch.load(out / "ckpt" / "6" / "checkpoint.pth", weights_only=True)["model"]
    assert all(torch.equal(value, model[f"teacher.{key}"]) for key, value in teacher.items())
    scores = json.loads((out / "eval" / "knn.json").read_text())
    assert list(scores["top1"]) == ["0", "4", "6"] and 0 <= scores["final"] <= 100  # the final k-NN was redone
    assert [r["iteration"] for r in _metrics(out)] == list(range(6))  # no line lost or repeated
    assert "run finished: weights" in (out / "logs" / "log.txt").read_text()


# -- Ctrl-C and SIGTERM -----------------------------------------------------------------------------------------------

SLOW_STEPS = """
import sys, time
from dinocell.logging import MetricsLogger

real_log = MetricsLogger.log

def log_slowly(self, record):
    real_log(self, record)
    time.sleep(0.5)  # time for the test to send its signal between two iterations

MetricsLogger.log = log_slowly
from dinocell.commands.train import main
sys.exit(main(sys.argv[1:]))
"""


def _start_and_signal(out: Path, sig: int, *extra: str) -> subprocess.CompletedProcess:
    """Start a slowed-down run in its own process group; once iteration 1 is logged, signal the group (as Slurm
    does: workers included)."""
    args = [sys.executable, "-c", SLOW_STEPS, f"--output-dir={out}", *TINY_DINO, "train.num_workers=1", *extra]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    metrics = out / "training_metrics.json"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    train(_cfg(reference, "checkpointing.period=100"))
    out = tmp_path / "run"
    stopped = _start_and_signal(out, signal.SIGTERM, "checkpointing.period=100")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    (saved,) = list_checkpoints(out / "ckpt")  # no periodic checkpoint before 6: this one is SIGTERM's
    assert 2 <= int(saved.name) < 6
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"dinocell train: stopped by SIGTERM; the newest checkpoint is {saved} (iteration {saved.name}). "
        f"Resume with: dinocell train --output-dir={out} student.arch=vit_test")
    assert "SIGTERM: stopping after this iteration, with a checkpoint" in (out / "logs" / "log.txt").read_text()

    train(_cfg(out, "checkpointing.period=100"))
    a, b = _metrics(reference), _metrics(out)
    assert [r["iteration"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in LOSS_FIELDS} == {k: rb[k] for k in LOSS_FIELDS}, ra["iteration"]


@pytest.mark.slow
def test_ctrl_c_and_an_immediate_sigterm_name_the_checkpoint_and_the_command(tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted = _start_and_signal(out, signal.SIGINT, "checkpointing.period=1")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    newest = list_checkpoints(out / "ckpt")[-1]
    assert interrupted.stderr.strip().splitlines()[-1].startswith(
        f"dinocell train: interrupted (Ctrl-C); the newest checkpoint is {newest}")
    assert "Traceback" not in interrupted.stderr

    terminated = _start_and_signal(tmp_path / "other", signal.SIGTERM, "checkpointing.save_on_sigterm=false",
                                   "checkpointing.period=100")
    assert terminated.returncode == 143 and not list_checkpoints(tmp_path / "other" / "ckpt")
    assert "stopped by SIGTERM; there is no checkpoint yet (a rerun starts from iteration 0)" in terminated.stderr

    monkeypatch.setenv(train_command.LAUNCH_ENV, "./launch_ssl.sh configs/train/demo.yaml")
    assert train_command.resume_command(["--no-resume"]) == "./launch_ssl.sh configs/train/demo.yaml"
    monkeypatch.delenv(train_command.LAUNCH_ENV)
    assert train_command.resume_command(["--no-resume", "--output-dir", "a b"]) == "dinocell train --output-dir 'a b'"


def test_user_error_types_are_marked():
    from dinocell.data.io.s3 import S3AccessError
    from dinocell.data.registry import DatasetStringError
    from dinocell.eval.errors import EvalError
    from dinocell.train.train import NonFiniteLossError

    for error in (ConfigError, DatasetError, DatasetStringError, WeightsError, S3AccessError, EvalError,
                  NonFiniteLossError, ResumeError, UnreadableCheckpointsError):
        assert issubclass(error, UserError), error
    assert NonFiniteLossError.exit_code == 1 and ConfigError.exit_code == 2
