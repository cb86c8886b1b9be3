"""Launchers: Slurm jobs through submitit (`submit`), Kubernetes manifests (`k8s`)."""
