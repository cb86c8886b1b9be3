"""Kubernetes manifests (`dinocell k8s`) validated against the Kubernetes schemas of kubernetes-validate, the torchrun
command lines parsed by torchrun's own parser, the S3 sync scripts run against a stub `aws`, and the Dockerfile
checked statically (no docker on the test machines: it is not built here)."""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dinocell.commands import k8s as k8s_cli
from dinocell.config import load_config
from dinocell.run import k8s

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")

ROOT = Path(__file__).resolve().parents[1]
# 1.29: the oldest release whose pods run native sidecars (the S3 uploader) by default; and the newest schemas shipped
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
IMAGE = "registry.example.org/dinocell:0.1.0"


def _render(tmp_path: Path, kind: str, nodes: int, output: str, *extra: str) -> list[dict]:
    path = tmp_path / f"{kind}-{nodes}.yaml"
    argv = [kind, "--name", "vits8", "--image", IMAGE, "--output", output, "--nodes", str(nodes), "-o", str(path),
            "--config-file", str(ROOT / "configs" / "train" / "demo.yaml"), "optim.lr=0.0123", *extra]
    assert k8s_cli.main(argv) == 0
    return list(yaml.safe_load_all(path.read_text()))


def _validate(obj: dict) -> None:
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{obj['kind']} {version}: {err.message} at {list(err.absolute_path)}")


def _validate_pod_template(template: dict, name: str) -> None:
    """A custom resource's embedded pod template, checked as a core PodTemplate."""
    _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})


def _torchrun_args(command: list[str]) -> list[str]:
    """The arguments after `python -m torch.distributed.run`, checked by torchrun's own parser."""
    from torch.distributed.run import get_args_parser

    assert command[:3] == ["python", "-m", "torch.distributed.run"], command
    args = command[3:]
    parsed = get_args_parser().parse_args(args)
    assert parsed.module and parsed.training_script == "dinocell.train"
    assert parsed.training_script_args == ["--config-file", "/etc/dinocell/config.yaml"]
    return args


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("output", ["pvc:runs", "s3://my-bucket/dinocell"])
def test_indexed_job_and_headless_service(tmp_path, nodes, output):
    config_map, service, job = _render(tmp_path, "job", nodes, output, "--gpus-per-node", "8", "--memory-gb", "200")
    for obj in (config_map, service, job):
        _validate(obj)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # Kubernetes labels a Job's pods batch.kubernetes.io/job-name=<job>: the Service must select exactly those
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", nodes, nodes)
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] and pod["restartPolicy"] == "Never"
    trainer = pod["containers"][0]
    args = _torchrun_args(trainer["command"])
    assert f"--nnodes={nodes}" in args and "--nproc-per-node=8" in args
    assert "--rdzv-backend=c10d" in args and "--rdzv-endpoint=vits8-0.vits8:29500" in args  # pod 0 via the Service
    assert trainer["resources"] == {"requests": {"memory": "200Gi"}, "limits": {"nvidia.com/gpu": 8}}
    _check_config_map(tmp_path, config_map, pod)
    _check_output(pod, output)


@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("output", ["pvc:runs", "s3://my-bucket/dinocell"])
def test_pytorchjob(tmp_path, nodes, output):
    config_map, job = _render(tmp_path, "pytorchjob", nodes, output, "--gpus-per-node", "0", "--cpus", "16")
    _validate(config_map)
    # kubernetes-validate ships core schemas only: a custom resource has none, so its pod templates are checked
    with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == ({"Master", "Worker"} if nodes > 1 else {"Master"})
    assert replicas["Master"]["replicas"] == 1 and replicas.get("Worker", {"replicas": 0})["replicas"] == nodes - 1
    for role, replica in replicas.items():
        assert set(replica) == {"replicas", "restartPolicy", "template"} and replica["restartPolicy"] == "OnFailure"
        _validate_pod_template(replica["template"], f"vits8-{role.lower()}")
        trainer = replica["template"]["spec"]["containers"][0]
        assert trainer["name"] == "pytorch"  # the operator injects MASTER_ADDR/PORT, RANK into this container
        assert trainer["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]  # MASTER_PORT comes from it
        assert trainer["command"][:2] == ["bash", "-c"] and "resources" in trainer
        assert trainer["resources"] == {"requests": {"cpu": 16}}  # CPU pods: no GPU limit
        operator_env = {"RANK": "3", "MASTER_ADDR": "vits8-master-0", "MASTER_PORT": "29500"}
        expanded = subprocess.run(["bash", "-c", "echo " + trainer["command"][2].removeprefix("exec ")],
                                  env={"PATH": os.environ["PATH"], **operator_env}, capture_output=True, text=True)
        args = _torchrun_args(shlex.split(expanded.stdout))
        assert args[:5] == [f"--nnodes={nodes}", "--nproc-per-node=1", "--node-rank=3",
                            "--master-addr=vits8-master-0", "--master-port=29500"]
        _check_config_map(tmp_path, config_map, replica["template"]["spec"])
        _check_output(replica["template"]["spec"], output)


def _check_config_map(tmp_path: Path, config_map: dict, pod: dict) -> None:
    """The pods' --config-file is the merged recipe + overrides, with the run directory on the output volume."""
    volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    frozen = tmp_path / "frozen.yaml"
    frozen.write_text(config_map["data"]["config.yaml"])
    cfg = load_config(frozen)  # what `dinocell train --config-file /etc/dinocell/config.yaml` does in the pod
    demo = OmegaConf.load(ROOT / "configs" / "train" / "demo.yaml")
    assert cfg.optim.lr == 0.0123 and cfg.train.output_dir == "/output/vits8"
    assert cfg.student.arch == demo.student.arch and cfg.train.dataset_path == demo.train.dataset_path


def _check_output(pod: dict, output: str) -> None:
    volume = next(v for v in pod["volumes"] if v["name"] == "output")
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["output"] == "/output" and mounts["shm"] == "/dev/shm"
    # on SIGTERM torchrun waits this long for the workers' checkpoint; the pod's grace period covers that wait
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) + 30 <= pod["terminationGracePeriodSeconds"]
    if output.startswith("pvc:"):
        assert volume == {"name": "output", "persistentVolumeClaim": {"claimName": "runs"}}
        assert "initContainers" not in pod
        return
    assert volume == {"name": "output", "emptyDir": {}}
    fetch, upload = pod["initContainers"]  # fetch runs to completion first; upload keeps running beside training
    assert "restartPolicy" not in fetch and upload["restartPolicy"] == "Always"
    for container in (fetch, upload):
        script = container["command"][2]
        assert subprocess.run(["sh", "-n", "-c", script]).returncode == 0
        assert "s3://my-bucket/dinocell/vits8" in script and "/output/vits8" in script


def test_torchrun_takes_the_shutdown_timeout_the_pods_set(monkeypatch):
    """torchrun reads the variable the trainer container sets (its own default is a 30 s wait before SIGKILL)."""
    from torch.distributed.run import config_from_args, get_args_parser

    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(k8s.SHUTDOWN_TIMEOUT_S))
    config, *_ = config_from_args(get_args_parser().parse_args(["--nproc-per-node=1", "-m", "dinocell.train"]))
    assert config.shutdown_timeout == k8s.SHUTDOWN_TIMEOUT_S == 120


def test_s3_fetch_takes_the_newest_checkpoint_only(tmp_path):
    """The init container's script, run with a stub `aws` that records its calls and lists four checkpoints."""
    pod = _render(tmp_path, "job", 2, "s3://my-bucket/dinocell", "--s3-secret", "aws-creds")[2]["spec"]["template"]
    fetch = pod["spec"]["initContainers"][0]
    assert fetch["envFrom"] == [{"secretRef": {"name": "aws-creds"}}]
    stub = tmp_path / "bin" / "aws"
    stub.parent.mkdir()
    stub.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
if [ "$2" = ls ]; then printf '%s\\n' "PRE 300/" "PRE 2000/" "PRE 40/" "PRE .tmp-2100/" "2026-01-01 00:00 5 notes"; fi
""")
    stub.chmod(0o755)
    script = fetch["command"][2].replace("/output/", f"{tmp_path}/output/")
    run = subprocess.run(["sh", "-c", script], env={"PATH": f"{stub.parent}:{os.environ['PATH']}"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "newest checkpoint: 2000" in run.stdout
    calls = (tmp_path / "calls").read_text().splitlines()
    src = "s3://my-bucket/dinocell/vits8"
    assert calls[0].startswith(f"s3 sync {src} {tmp_path}/output/vits8 ") and "--exclude ckpt/*" in calls[0]
    assert calls[1] == f"s3 ls {src}/ckpt/"
    assert calls[2].startswith(f"s3 sync {src}/ckpt/2000 {tmp_path}/output/vits8/ckpt/2000")


@pytest.mark.parametrize(("argv", "message"), [
    (["job", "--name", "ViT_8", "--output", "pvc:runs"], "name 'ViT_8': expected lower-case letters"),
    (["job", "--name", "x", "--output", "runs"], "output 'runs': expected pvc:CLAIM"),
    (["cronjob", "--name", "x", "--output", "pvc:runs"], "invalid choice: 'cronjob'"),
    (["job", "--name", "x", "--output", "pvc:runs", "optim.lrr=1"], "optim.lrr"),
])  # fmt: skip
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    if argv[0] == "cronjob":  # argparse's own check
        with pytest.raises(SystemExit) as exit_info:
            k8s_cli.main([*argv, "--image", IMAGE])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        return
    assert k8s_cli.main([*argv, "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinocell k8s: ") and message in err and len(err.splitlines()) == 1


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0], line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_is_well_formed_and_copies_what_exists():
    """Static checks only (docker cannot run here): known instructions, FROM first, every COPY source present and not
    excluded by .dockerignore, the package installed after its sources are copied, exec-form CMD."""
    instructions = _dockerfile()
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "ADD", "CMD", "ENTRYPOINT", "USER", "LABEL", "EXPOSE",
             "VOLUME", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}
    assert {name for name, _ in instructions} <= known
    assert next(name for name, _ in instructions if name != "ARG") == "FROM"
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    copied = []
    for name, args in instructions:
        if name == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source
            copied += sources
    install = next(i for i, (name, args) in enumerate(instructions) if name == "RUN" and 'pip install "."' in
                   args.replace(".[wandb]", "."))
    copy_positions = [i for i, (name, args) in enumerate(instructions) if name == "COPY" and
                      ("dinocell" in args or "pyproject.toml" in args)]
    assert max(copy_positions) < install and {"pyproject.toml", "dinocell"} <= set(copied)
    assert {".venv", ".git"} <= set(ignored)
    cmd = dict(instructions)["CMD"]
    assert yaml.safe_load(cmd) == ["dinocell", "--help"]
    torch_spec = re.search(r'ARG TORCH_SPEC="torch==([\d.]+)"', (ROOT / "deploy" / "Dockerfile").read_text())
    minimum = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    assert as_tuple(torch_spec.group(1)) >= as_tuple(minimum.group(1))
