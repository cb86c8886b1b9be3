"""`dinocell k8s`: render Kubernetes manifests for a training run (PyTorchJob, or indexed Job + headless Service)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dinocell.commands.boundary import add_debug_option, command

EXAMPLES = """\
examples:
  # 4 nodes x 8 GPUs with the Kubeflow training operator, run directory on a ReadWriteMany claim
  dinocell k8s pytorchjob --name vits8 --image registry.example.org/dinocell:0.1.0 --output pvc:runs \\
      --config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --nodes 4 --gpus-per-node 8 | kubectl apply -f -
  # plain Kubernetes (indexed Job + headless Service), results copied to S3, credentials from a Secret
  dinocell k8s job --name vits8 --image registry.example.org/dinocell:0.1.0 --output s3://my-bucket/runs \\
      --s3-secret aws-credentials --config-file configs/train/dinov3_vits8_jump_s3_multiview.yaml --nodes 4 \\
      train.batch_size_per_gpu=32 -o vits8.yaml

The recipe and overrides are merged and validated now and shipped in a ConfigMap; paths in it (datasets, weights)
are read inside the pods. The run directory is /output/NAME in every pod. Image: deploy/Dockerfile.
Re-applying the same manifests resumes the run from its newest checkpoint. See docs/distributed.md.
"""


def build_parser() -> argparse.ArgumentParser:
    from dinocell.run.k8s import AWS_CLI_IMAGE, KINDS

    parser = argparse.ArgumentParser(
        prog="dinocell k8s",
        description="Print Kubernetes manifests (YAML) that train a config on NODES pods with GPUS-PER-NODE GPUs each.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=KINDS, help="pytorchjob: Kubeflow PyTorchJob (needs the training operator); "
                        "job: indexed Job + headless Service with torchrun's c10d rendezvous")
    parser.add_argument("--name", required=True, help="name of the run and of its objects (lower case, digits, '-')")
    parser.add_argument("--image", required=True, help="training image (built from deploy/Dockerfile)")
    parser.add_argument("--output", required=True, help="run storage: pvc:CLAIM or s3://bucket/prefix")
    parser.add_argument("--config-file", default=None,
                        help="YAML recipe (a path, or an s3:// or https:// URL) merged over the default config")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. train.batch_size_per_gpu=32")
    parser.add_argument("--nodes", type=int, default=1, help="pods, one per node (default %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=1,
                        help="GPUs per pod, one process each (default %(default)s; 0 = one CPU process per pod)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs to request per pod")
    parser.add_argument("--memory-gb", type=int, default=None, help="memory to request per pod, in GiB")
    parser.add_argument("--namespace", default=None, help="namespace of the objects (default: kubectl's)")
    parser.add_argument("--s3-secret", default=None, help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                        "(and AWS_ENDPOINT_URL for MinIO etc.) for s3:// output")
    parser.add_argument("--sync-interval-s", type=int, default=600,
                        help="s3:// output: seconds between uploads (default %(default)s)")
    parser.add_argument("--sync-image", default=AWS_CLI_IMAGE, help="s3:// output: AWS CLI image (default %(default)s)")
    parser.add_argument("-o", "--out", type=Path, default=None, help="write the YAML here instead of stdout")
    add_debug_option(parser)
    return parser


@command("dinocell k8s")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)

    from dinocell.commands.common import load_checked_config
    from dinocell.config import config_to_yaml
    from dinocell.run import k8s

    run = k8s.K8sRun(
        name=args.name, image=args.image, output=args.output, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        cpus_per_node=args.cpus, memory_gb=args.memory_gb, namespace=args.namespace, s3_secret=args.s3_secret,
        sync_interval_s=args.sync_interval_s, sync_image=args.sync_image,
    )
    cfg = load_checked_config(args.config_file, [*args.overrides, f"train.output_dir={run.run_dir}"])
    manifests = k8s.to_yaml(k8s.render(run, config_to_yaml(cfg), args.kind))
    if args.out is None:
        sys.stdout.write(manifests)
    else:
        args.out.write_text(manifests)
        print(f"wrote {args.kind} manifests for {run.nodes} node(s) to {args.out}: kubectl apply -f {args.out}",
              file=sys.stderr)
    return 0
