"""Kubernetes manifests for a training run: a Kubeflow PyTorchJob, or an indexed Job with a headless Service.

Both run `torchrun -m dinocell.train` in every pod (one process per GPU) on a config frozen into a ConfigMap at render
time (recipe + overrides merged and validated here, so a typo fails now rather than in a pod). Pods are numbered
0..nodes-1 and meet through a rendezvous:

- PyTorchJob (needs the Kubeflow training operator): the operator gives each pod MASTER_ADDR, MASTER_PORT and RANK
  (the pod's index, the Master being 0); torchrun uses a static rendezvous with node rank RANK. A failed pod is
  restarted (restartPolicy OnFailure) and the others, whose collectives then fail, too; every restart resumes from the
  newest checkpoint.
- Indexed Job + headless Service (plain Kubernetes): pod i is `<name>-i.<name>`; torchrun's c10d rendezvous runs on
  pod 0 (`<name>-0.<name>:29500`) and tolerates `max_restarts` re-rendezvous, so a replaced pod rejoins and training
  resumes from the newest checkpoint.

Output storage (the run directory `/output/<name>`):
- `pvc:CLAIM`: a PersistentVolumeClaim mounted in every pod (ReadWriteMany when nodes > 1: rank 0 writes the
  checkpoints, every rank reads the newest one on resume).
- `s3://bucket/prefix`: pod-local disk (emptyDir) plus the AWS CLI: before training, an init container fetches the
  run's files and its newest checkpoint from `s3://bucket/prefix/<name>`; a sidecar uploads new files every
  `sync_interval_s` and once more when training ends. Nothing is deleted on S3 (checkpoints accumulate there).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from dinocell.errors import UsageError

KINDS = ("pytorchjob", "job")
PORT = 29500
CONFIG_DIR = "/etc/dinocell"
OUTPUT_ROOT = "/output"
AWS_CLI_IMAGE = "amazon/aws-cli:2.17.0"
MAX_RESTARTS = 3  # re-rendezvous (c10d) or pod restarts (PyTorchJob) before the run is declared failed
# On SIGTERM (pod deletion, preemption) the run writes a checkpoint at the next iteration, then stops: torchrun waits
# this long for it before it kills the workers (its own default is 30 s; older torchruns ignore the variable), and the
# pod's grace period covers that wait, plus the final upload with S3 output
SHUTDOWN_TIMEOUT_S = 120
GRACE_PERIOD_S = {"pvc": SHUTDOWN_TIMEOUT_S + 30, "s3": 300}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class K8sRun:
    """What the manifests are parameterised by. `output`: `pvc:CLAIM` or `s3://bucket/prefix`."""

    name: str
    image: str
    output: str
    nodes: int = 1
    gpus_per_node: int = 1  # 0: CPU pods, one process each
    cpus_per_node: int | None = None  # requested CPUs per pod
    memory_gb: int | None = None  # requested memory per pod
    namespace: str | None = None
    s3_secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL, ...)
    sync_interval_s: int = 600
    sync_image: str = AWS_CLI_IMAGE

    def __post_init__(self) -> None:
        longest_pod = f"{self.name}-{self.nodes - 1}"  # indexed Job pods are <name>-<index>: a DNS label each
        if not _DNS_LABEL.match(self.name) or len(longest_pod) > 63:
            raise UsageError(f"name '{self.name}': expected lower-case letters, digits and '-', starting and ending "
                             f"with a letter or digit, at most {63 - len(str(self.nodes - 1)) - 1} characters")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.sync_interval_s < 1:
            raise UsageError(f"nodes >= 1, gpus_per_node >= 0 and sync_interval_s >= 1 expected, got {self.nodes}, "
                             f"{self.gpus_per_node}, {self.sync_interval_s}")
        if not self.image:
            raise UsageError("image: give the training image, e.g. registry.example.org/dinocell:0.1.0")
        if not (self.output.startswith("pvc:") and _DNS_LABEL.match(self.output[4:])) and not re.match(
            r"^s3://[a-z0-9][a-z0-9.-]+[a-z0-9](/.*)?$", self.output
        ):
            raise UsageError(f"output '{self.output}': expected pvc:CLAIM (an existing PersistentVolumeClaim) or "
                             "s3://bucket/prefix")

    @property
    def run_dir(self) -> str:
        return f"{OUTPUT_ROOT}/{self.name}"

    @property
    def s3_url(self) -> str:
        return f"{self.output.rstrip('/')}/{self.name}"


def render(run: K8sRun, config_yaml: str, kind: str) -> list[dict[str, Any]]:
    """The objects to `kubectl apply`: ConfigMap + PyTorchJob, or ConfigMap + Service + indexed Job."""
    if kind not in KINDS:
        raise UsageError(f"kind '{kind}': expected one of {', '.join(KINDS)}")
    config_map = _object("v1", "ConfigMap", f"{run.name}-config", run)
    config_map["data"] = {"config.yaml": config_yaml}
    if kind == "pytorchjob":
        return [config_map, _pytorchjob(run)]
    return [config_map, _headless_service(run), _indexed_job(run)]


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (the config, the sync scripts) as `|` blocks; repeated pod templates written out in full
    rather than as YAML anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_ReadableDumper.add_representer(str, _represent_str)


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return yaml.dump_all(objects, Dumper=_ReadableDumper, sort_keys=False, width=120)


def _object(api_version: str, kind: str, name: str, run: K8sRun) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": _labels(run)}
    if run.namespace:
        metadata["namespace"] = run.namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def _labels(run: K8sRun) -> dict[str, str]:
    return {"app.kubernetes.io/name": "dinocell", "app.kubernetes.io/instance": run.name}


def _torchrun(run: K8sRun, rendezvous: list[str]) -> list[str]:
    per_node = max(run.gpus_per_node, 1)
    return ["python", "-m", "torch.distributed.run", f"--nnodes={run.nodes}", f"--nproc-per-node={per_node}",
            *rendezvous, "-m", "dinocell.train", "--config-file", f"{CONFIG_DIR}/config.yaml"]


def _trainer(run: K8sRun, name: str, command: list[str]) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    requests = {k: v for k, v in (("cpu", run.cpus_per_node), ("memory", run.memory_gb and f"{run.memory_gb}Gi")) if v}
    if requests:
        resources["requests"] = requests
    if run.gpus_per_node:
        resources["limits"] = {"nvidia.com/gpu": run.gpus_per_node}
    container = {
        "name": name,
        "image": run.image,
        "command": command,
        "ports": [{"name": "pytorchjob-port" if name == "pytorch" else "rendezvous", "containerPort": PORT}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_TIMEOUT_S)}],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "output", "mountPath": OUTPUT_ROOT},
            {"name": "shm", "mountPath": "/dev/shm"},  # DataLoader workers pass batches through shared memory
        ],
    }
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(run: K8sRun, trainer: dict[str, Any]) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{run.name}-config"}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    spec: dict[str, Any] = {"containers": [trainer], "volumes": volumes}
    if run.output.startswith("pvc:"):
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": run.output[4:]}})
        spec["terminationGracePeriodSeconds"] = GRACE_PERIOD_S["pvc"]
    else:
        volumes.append({"name": "output", "emptyDir": {}})
        spec["initContainers"] = [_s3_fetch(run), _s3_upload(run)]
        spec["terminationGracePeriodSeconds"] = GRACE_PERIOD_S["s3"]
    return spec


def _aws_container(run: K8sRun, name: str, script: str) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": run.sync_image,
        "command": ["/bin/sh", "-c", script],
        "volumeMounts": [{"name": "output", "mountPath": OUTPUT_ROOT}],
    }
    if run.s3_secret:
        container["envFrom"] = [{"secretRef": {"name": run.s3_secret}}]
    return container


def _s3_fetch(run: K8sRun) -> dict[str, Any]:
    """Init container: the run's files without checkpoints, then only the newest checkpoint (what resume reads)."""
    src, dst = shlex.quote(run.s3_url), shlex.quote(run.run_dir)
    script = f"""set -eu
mkdir -p {dst}
aws s3 sync {src} {dst} --only-show-errors --exclude 'ckpt/*' --exclude 'ckpt.replaced-*'
newest=$(aws s3 ls {src}/ckpt/ | awk '$1 == "PRE" {{ sub("/$", "", $2); if ($2 ~ /^[0-9]+$/) print $2 }}' \\
    | sort -n | tail -n 1)
if [ -n "$newest" ]; then aws s3 sync {src}/ckpt/"$newest" {dst}/ckpt/"$newest" --only-show-errors; fi
echo "fetched {run.s3_url} (newest checkpoint: ${{newest:-none}})"
"""
    return _aws_container(run, "fetch-run", script)


def _s3_upload(run: K8sRun) -> dict[str, Any]:
    """Native sidecar (an init container that keeps running): uploads every interval and when the pod stops.
    Files fetched at start keep S3's modification times, so a pod that wrote nothing uploads nothing."""
    src, dst = shlex.quote(run.run_dir), shlex.quote(run.s3_url)
    script = f"""upload() {{ aws s3 sync {src} {dst} --only-show-errors --exclude '*/.tmp-*' --exclude '*/.old-*'; }}
trap 'upload; exit 0' TERM
while true; do sleep {run.sync_interval_s} & wait $!; upload; done
"""
    container = _aws_container(run, "upload-run", script)
    container["restartPolicy"] = "Always"
    return container


def _pytorchjob(run: K8sRun) -> dict[str, Any]:
    static = ["--node-rank=$RANK", "--master-addr=$MASTER_ADDR", "--master-port=$MASTER_PORT"]  # set by the operator
    command = ["bash", "-c", "exec " + " ".join(_torchrun(run, static))]
    template = {"metadata": {"labels": _labels(run)}, "spec": _pod_spec(run, _trainer(run, "pytorch", command))}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if run.nodes > 1:
        replicas["Worker"] = {"replicas": run.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    job = _object("kubeflow.org/v1", "PyTorchJob", run.name, run)
    job["spec"] = {"runPolicy": {"backoffLimit": MAX_RESTARTS * run.nodes}, "pytorchReplicaSpecs": replicas}
    return job


def _headless_service(run: K8sRun) -> dict[str, Any]:
    service = _object("v1", "Service", run.name, run)
    service["spec"] = {
        "clusterIP": "None",
        "selector": {"batch.kubernetes.io/job-name": run.name},
        "publishNotReadyAddresses": True,  # pods are addressable before any readiness: the rendezvous needs that
        "ports": [{"name": "rendezvous", "port": PORT}],
    }
    return service


def _indexed_job(run: K8sRun) -> dict[str, Any]:
    c10d = ["--rdzv-backend=c10d", f"--rdzv-endpoint={run.name}-0.{run.name}:{PORT}", f"--rdzv-id={run.name}",
            f"--max-restarts={MAX_RESTARTS}"]
    spec = _pod_spec(run, _trainer(run, "trainer", _torchrun(run, c10d)))
    spec.update(subdomain=run.name, restartPolicy="Never")  # pod i is <name>-i.<name> in the Service's DNS
    job = _object("batch/v1", "Job", run.name, run)
    job["spec"] = {
        "completionMode": "Indexed",
        "completions": run.nodes,
        "parallelism": run.nodes,
        "backoffLimit": MAX_RESTARTS * run.nodes,
        "template": {"metadata": {"labels": _labels(run)}, "spec": spec},
    }
    return job
