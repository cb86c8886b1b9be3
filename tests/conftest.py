"""Shared test set-up: one torch thread per test process (tests run two at a time on a 2-core CI machine), and the
one-node Slurm cluster of the Slurm tests."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real Slurm (munged, slurmctld, slurmd) on localhost for the session; skips, saying why, where it cannot start.
    Client commands find it through SLURM_CONF (in `cluster.env`; set it in os.environ for submitit)."""
    from slurm_cluster import SlurmCluster, SlurmUnavailable

    try:
        cluster = SlurmCluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm cluster: {err}")
    yield cluster
    cluster.stop()
