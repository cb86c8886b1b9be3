"""Slurm: `dinocell submit` (submitit) and the plain sbatch template, on a real one-node Slurm (tests/slurm_cluster.py).

Without Slurm the cluster tests skip (the fixture says why); the option, script and argument tests run everywhere.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_runs import TINY_DINO

from dinocell import distributed
from dinocell.commands import submit as submit_cli
from dinocell.run import submit
from dinocell.train.checkpoint import list_checkpoints
from dinocell.train.signals import sigterm_stops_run

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "slurm" / "train.sbatch"
# 12 iterations and no periodic checkpoint before the last: a checkpoint mid-run is the requeue signal's
RUN = [*TINY_DINO, "optim.epochs=6", "checkpointing.period=100", "evaluation.eval_period_iterations=0",
       "student.drop_path_rate=0.1"]  # drop path: each rank's random stream must survive the requeue too
ITERATIONS = 12
LOSS_FIELDS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "grad_norm",
               "lr", "wd", "momentum", "teacher_temp")
CPU_JOB = ["--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "training_metrics.json").read_text().splitlines()]


# -- options, batch script, task arguments (no Slurm needed) ----------------------------------------------------------


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90), ("90:30", 91), ("24:00:00", 1440), ("2-12", 3600), ("2-12:30", 3630), ("1-00:00:01", 1441),
])  # fmt: skip
def test_time_limits_in_slurm_formats(text, minutes):
    assert submit.parse_time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "0", "-5", "1:2:3:4", "x-1"])
def test_bad_time_limit_is_named(text):
    with pytest.raises(ValueError, match=f"time limit '{re.escape(text)}': expected minutes"):
        submit.parse_time_minutes(text)


def test_resources_become_sbatch_parameters():
    cfg = submit.load_run_config(None, ["train.num_workers=7"], "/runs/vits8")
    gpu = submit.SlurmResources(nodes=2, gpus_per_node=8, mem_gb=400, time_min=2880, partition="gpu", account="lab",
                                qos="high", constraint="h100", exclude="n[1-2]", comment="jump")
    assert submit.sbatch_parameters(gpu, cfg) == {
        "job_name": "dinocell-vits8", "nodes": 2, "ntasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 8,
        "mem": "400G", "time": 2880, "signal_delay_s": 120, "partition": "gpu", "account": "lab", "qos": "high",
        "constraint": "h100", "exclude": "n[1-2]", "comment": "jump",
    }  # fmt: skip
    cpu = submit.sbatch_parameters(submit.SlurmResources(gpus_per_node=0, tasks_per_node=4, cpus_per_task=2), cfg)
    assert cpu["ntasks_per_node"] == 4 and cpu["cpus_per_task"] == 2 and "gpus_per_node" not in cpu


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "tasks_per_node=2 with gpus_per_node=4: training runs one task per"),
    ({"nodes": 0}, "nodes must be >= 1, got 0"),
    ({"gpus_per_node": -1}, "gpus_per_node must be >= 0, got -1"),
    ({"mem_gb": 0}, "mem_gb must be >= 1 when given, got 0"),
    ({"time_min": 2}, "signal_delay_s=120 must be shorter than the time limit (120 s)"),
])  # fmt: skip
def test_impossible_resources_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        submit.SlurmResources(**kwargs)


def test_dry_run_prints_the_batch_script_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "1-00:00",
            "--dry-run", "train.num_workers=3"]
    assert submit_cli.main(argv) == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --partition=gpu", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@120", "#SBATCH --job-name=dinocell-run"):
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun"))
    assert f"--output {out}/slurm/%j_%t_log.out" in srun and f"--error {out}/slurm/%j_%t_log.err" in srun
    assert not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--time", "1h"], "time limit '1h'"),
    (["--tasks-per-node", "2"], "tasks_per_node=2 with gpus_per_node=1"),
    (["optim.lrr=0.1"], "optim.lrr"),
])  # fmt: skip
def test_bad_arguments_exit_2_with_the_reason(argv, message, tmp_path, capsys):
    assert submit_cli.main(["--output-dir", str(tmp_path / "run"), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinocell submit: ") and message in err and len(err.splitlines()) == 1


def test_no_resume_applies_to_the_first_attempt_only(monkeypatch):
    task = submit.TrainingTask(Path("/runs/x/slurm/config.yaml"), fresh_start=True)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert task.argv() == ["--config-file", "/runs/x/slurm/config.yaml", "--no-resume"]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: resume, whoever requeued the job
    assert task.argv() == ["--config-file", "/runs/x/slurm/config.yaml"]


@pytest.fixture
def submitit_handler():
    """A stand-in for the USR2 handler submitit installs in a job (checkpoint() and requeue): records its calls."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def _task_with_run(monkeypatch, run, signal_delay_s=120):
    monkeypatch.setattr(submit, "run_training", run)
    return submit.TrainingTask(Path("/runs/x/slurm/config.yaml"), signal_delay_s=signal_delay_s)


def test_requeue_signal_checkpoints_first_then_requeues(monkeypatch, submitit_handler):
    def run(argv):
        with sigterm_stops_run(save_checkpoint=True) as stop:  # as `dinocell train` runs the training loop
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.reason == "the requeue signal (USR2)" and submitit_handler == []  # not requeued yet
        return 143  # the loop wrote its checkpoint and stopped (dinocell.commands.train)

    installed = signal.getsignal(signal.SIGUSR2)
    _task_with_run(monkeypatch, run)()  # returns instead of raising: the job is being requeued, not failing
    assert submitit_handler == [signal.SIGUSR2]
    assert signal.getsignal(signal.SIGUSR2) is installed  # submitit's handler is back


def test_requeue_signal_requeues_at_once_when_no_loop_listens(monkeypatch, submitit_handler):
    def run(argv):
        os.kill(os.getpid(), signal.SIGUSR2)  # before the loop starts, or with checkpointing.save_on_sigterm=false
        assert submitit_handler == [signal.SIGUSR2]
        return 0

    _task_with_run(monkeypatch, run)()
    assert submitit_handler == [signal.SIGUSR2]  # once


def test_requeue_signal_requeues_at_the_deadline_when_the_loop_has_not_stopped(monkeypatch, submitit_handler):
    def run(argv):
        with sigterm_stops_run(save_checkpoint=True):
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not submitit_handler and time.monotonic() < deadline:  # a step or a checkpoint that takes long
                time.sleep(0.01)
            assert submitit_handler == [signal.SIGUSR2]  # requeued by the alarm, 0.75 x 0.4 s after the signal
        return 143

    _task_with_run(monkeypatch, run, signal_delay_s=0.4)()
    assert submitit_handler == [signal.SIGUSR2]  # not requeued a second time


def test_requeue_signal_after_the_last_iteration_lets_the_job_complete(monkeypatch, submitit_handler):
    def run(argv):
        with sigterm_stops_run(save_checkpoint=True):
            os.kill(os.getpid(), signal.SIGUSR2)
        return 0  # the run had finished: nothing left to requeue

    _task_with_run(monkeypatch, run)()
    assert submitit_handler == [] and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_slurm_jobs_get_their_own_rendezvous_port(monkeypatch):
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "MASTER_ADDR": "n1", "SLURM_JOB_ID": "12345"}
    monkeypatch.setattr(os, "environ", env)  # the function writes torchrun's variables: keep them out of this process
    distributed._torchrun_env_from_slurm()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_PORT"]) == ("1", "2", "1", str(20000 + 345))


def test_sbatch_template_is_valid_bash_and_needs_its_arguments():
    assert subprocess.run(["bash", "-n", str(TEMPLATE)], capture_output=True).returncode == 0
    bare = subprocess.run(["bash", str(TEMPLATE), "only_config.yaml"], capture_output=True, text=True, timeout=30)
    assert bare.returncode == 2 and "usage: sbatch" in bare.stderr
    directives = [line for line in TEMPLATE.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=B:USR1@120" in directives and "#SBATCH --requeue" in directives


# -- on the real Slurm ------------------------------------------------------------------------------------------------


def _tiny_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist(RUN), path)
    return path


# Slurm tests share one cluster and one reference run: they run on one pytest-xdist worker (--dist loadgroup)
def _sbatch_template(cluster, folder: Path) -> tuple[Path, str]:
    """Submit the sbatch template's CPU variant (2 tasks, gloo) on the test cluster: (run directory, job id)."""
    out = folder / "run"
    env = cluster.env | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = ["sbatch", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10",
               f"--output={folder}/batch-%j.out", str(TEMPLATE), str(_tiny_config(folder)), str(out)]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=folder)
    assert submitted.returncode == 0, submitted.stderr
    return out, re.search(r"Submitted batch job (\d+)", submitted.stdout).group(1)


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory):
    """The uninterrupted run, through the sbatch template."""
    folder = tmp_path_factory.mktemp("template")
    out, job_id = _sbatch_template(slurm_cluster, folder)
    state = slurm_cluster.wait(job_id, timeout_s=300)
    assert state == "COMPLETED", (state, (folder / f"batch-{job_id}.out").read_text()[-3000:])
    return folder, out, job_id


def _assert_resumed_mid_run_like_the_reference(out: Path, reference: Path) -> None:
    """The run stopped once, after a checkpoint it wrote for the requeue (there is no periodic one before the end),
    resumed from it and ended with the reference's metrics and teacher, bit for bit."""
    resumed = re.findall(r"resumed from \S+/ckpt/(\d+) at iteration", (out / "logs" / "log.txt").read_text())
    assert len(resumed) == 1 and 3 <= int(resumed[0]) < ITERATIONS, resumed
    assert [int(c.name) for c in list_checkpoints(out / "ckpt")] == [int(resumed[0]), ITERATIONS]
    expected, got = _metrics(reference), _metrics(out)
    assert [r["iteration"] for r in got] == list(range(ITERATIONS))
    for a, b in zip(expected, got):
        assert {k: a[k] for k in LOSS_FIELDS} == {k: b[k] for k in LOSS_FIELDS}, a["iteration"]
    dump_a = torch.load(reference / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    dump_b = torch.load(out / "eval" / "final" / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert dump_a.keys() == dump_b.keys() and all(torch.equal(dump_a[k], dump_b[k]) for k in dump_a)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_sbatch_template_trains_with_two_tasks(reference_run):
    folder, out, job_id = reference_run
    assert "1 node(s) x 2 task(s)" in (folder / f"batch-{job_id}.out").read_text()
    assert "(2 process(es) x 4 x 1 accumulation step(s))" in (out / "logs" / "log.txt").read_text()
    assert all((out / "slurm" / f"{job_id}_{task}.{ext}").is_file() for task in (0, 1) for ext in ("out", "err"))
    records = _metrics(out)
    assert [r["iteration"] for r in records] == list(range(ITERATIONS))
    assert all(torch.isfinite(torch.tensor([r[k] for k in LOSS_FIELDS])).all() for r in records)
    assert records[-1]["total_loss"] < records[0]["total_loss"]


def _wait_for_iterations(cluster, job_id: str, out: Path, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    metrics = out / "training_metrics.json"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= n):
        state = cluster.job_state(job_id)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state} before iteration {n}"
        assert time.monotonic() < deadline, f"fewer than {n} iterations after {timeout_s:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_submitted_job_requeued_mid_run_resumes_to_the_uninterrupted_metrics(
    slurm_cluster, reference_run, tmp_path, monkeypatch, capsys
):
    """`dinocell submit` a 2-task CPU job; after its second iteration, Slurm's time-limit signal (USR2) makes the run
    write a checkpoint at the next iteration and stop, then submitit call checkpoint() and requeue the job; the second
    attempt resumes from that checkpoint (though submitted with --no-resume) and ends with the metrics and teacher of
    the uninterrupted run, bit for bit."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    out = tmp_path / "run"
    argv = ["--config-file", str(_tiny_config(tmp_path)), "--output-dir", str(out), *CPU_JOB, "--no-resume"]
    assert submit_cli.main([*argv, "--dry-run"]) == 0
    dry_run = capsys.readouterr().out
    assert submit_cli.main(argv) == 0
    printed = capsys.readouterr().out
    job_id = re.search(r"submitted Slurm job (\d+)", printed).group(1)
    assert f"task logs {out}/slurm/{job_id}_<task>_log" in printed

    _wait_for_iterations(slurm_cluster, job_id, out, 2, timeout_s=180)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=slurm_cluster.env, check=True, timeout=30)
    state = slurm_cluster.wait(job_id, timeout_s=300)
    task0_log = (out / "slurm" / f"{job_id}_0_log.err").read_text()
    assert state == "COMPLETED", (state, task0_log[-3000:])
    assert slurm_cluster.job_field(job_id, "Restarts") == "1"
    assert "stopped by the requeue signal (USR2); the newest checkpoint is" in task0_log  # the run stopped first,
    assert "Caught signal SIGUSR2" in task0_log  # then submitit's handler ran: checkpoint() and requeue
    assert (out / "slurm" / f"{job_id}_submission.sh").read_text().rstrip("\n") == dry_run.rstrip("\n")

    assert not list(out.glob("replaced-*"))  # --no-resume did not apply to the second attempt
    _assert_resumed_mid_run_like_the_reference(out, reference_run[1])


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")
def test_sbatch_template_checkpoints_on_its_time_limit_signal_and_requeues(slurm_cluster, reference_run, tmp_path):
    """Slurm's time-limit signal to the template's batch shell (USR1): the trap has the tasks checkpoint and stop, then
    requeues the job, whose next attempt resumes from that checkpoint to the uninterrupted run's metrics."""
    out, job_id = _sbatch_template(slurm_cluster, tmp_path)
    _wait_for_iterations(slurm_cluster, job_id, out, 2, timeout_s=180)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm_cluster.env, check=True, timeout=30)
    state = slurm_cluster.wait(job_id, timeout_s=300)
    batch_log = (tmp_path / f"batch-{job_id}.out").read_text()
    assert state == "COMPLETED", (state, batch_log[-3000:])
    assert slurm_cluster.job_field(job_id, "Restarts") == "1"
    assert "time limit near: the tasks checkpoint and stop" in batch_log
    assert "stopped by SIGTERM; the newest checkpoint is" in (out / "slurm" / f"{job_id}_0.err").read_text()
    _assert_resumed_mid_run_like_the_reference(out, reference_run[1])
