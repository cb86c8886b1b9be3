"""Multi-node torchrun through launch_ssl.sh: two single-process "nodes" on localhost (c10d rendezvous on 127.0.0.1)
train exactly like one node with two processes."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tiny_runs import TINY_DINO

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch_ssl.sh"
LOSSES = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss", "grad_norm")


def _launcher_command(*args: str) -> list[str]:
    """What launch_ssl.sh would run on this machine (--dry-run), with this test's interpreter as `python`; torchrun
    gets 120 s to let the processes write their SIGTERM checkpoint (its default is 30 s)."""
    shown = subprocess.run([str(LAUNCHER), *args, "--dry-run"], env=_cpu_env(), capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0, shown.stderr
    command = shlex.split(shown.stdout)
    assert command[:3] == ["env", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=120", "python"], command
    return [sys.executable, *command[3:]]


def _cpu_env() -> dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID")
    return {k: v for k, v in os.environ.items() if k not in launcher_vars} | {
        "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_builds_multinode_commands():
    config = str(ROOT / "configs" / "train" / "demo.yaml")
    c10d = _launcher_command(config, "--nnodes", "2", "--rdzv-endpoint", "node01:29400", "optim.lr=0.1")
    assert c10d[1:] == ["-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                        "--rdzv-endpoint=node01:29400", "--rdzv-id=dinocell", "-m", "dinocell.train", "--config-file",
                        config, "optim.lr=0.1"]
    static = _launcher_command(config, "--nnodes=4", "--node-rank=3", "--rdzv-endpoint=node01:29400")
    assert static[3:7] == ["--nnodes=4", "--nproc-per-node=1", "--node-rank=3", "--master-addr=node01"]
    assert static[7] == "--master-port=29400"
    gpus = subprocess.run([str(LAUNCHER), config, "--dry-run"], env=_cpu_env() | {"CUDA_VISIBLE_DEVICES": "0,1,2"},
                          capture_output=True, text=True, timeout=30)
    assert "--standalone --nproc-per-node=3" in gpus.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--nnodes", "2"], "--rdzv-endpoint '': with --nnodes 2, give HOST:PORT"),
    (["--nnodes", "0"], "--nnodes '0': expected a whole number >= 1"),
    (["--nnodes", "2", "--rdzv-endpoint", "h:1", "--node-rank", "2"], "--node-rank '2': expected 0..1"),
    (["--node-rank", "0"], "--node-rank needs --nnodes > 1"),
    (["--rdzv-endpoint"], "--rdzv-endpoint needs a value"),
])  # fmt: skip
def test_launcher_refuses_incomplete_multinode_options(args, message):
    out = subprocess.run([str(LAUNCHER), str(ROOT / "configs" / "train" / "demo.yaml"), *args, "--dry-run"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and message in out.stderr


@pytest.mark.slow
def test_two_single_process_nodes_train_like_one_node_with_two_processes(tmp_path):
    config = tmp_path / "tiny.yaml"
    OmegaConf.save(OmegaConf.from_dotlist([*TINY_DINO, "train.batch_size_per_gpu=2", "student.drop_path_rate=0.0"]),
                   config)
    one_node = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                "dinocell.train", "--config-file", str(config), f"--output-dir={tmp_path / 'one_node'}"]
    # --standalone picks its own free port; the two "nodes" meet at 127.0.0.1 on another one
    node = _launcher_command(str(config), "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                             f"--output-dir={tmp_path / 'two_nodes'}")
    runs = [subprocess.Popen(c, env=_cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for c in (one_node, node, node)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), [o[-2000:] for o in outputs]

    def metrics(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "training_metrics.json").read_text().splitlines()]

    a, b = metrics("one_node"), metrics("two_nodes")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for field in LOSSES:  # the same 2 ranks either way; ranks may be assigned in the other order at rendezvous
            assert rb[field] == pytest.approx(ra[field], rel=1e-6, abs=1e-6), (ra["iteration"], field)
    assert "(2 process(es) x 2 x 1 accumulation step(s))" in (tmp_path / "two_nodes" / "logs" / "log.txt").read_text()
