"""Shared test set-up: one torch thread per test process (tests run two at a time on a 2-core CI machine), the same
random state at the start of every test, and the one-node Slurm cluster of the Slurm tests."""

import os
import random

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_state():
    """Seed torch, numpy and random before each test, so a test's random inputs do not depend on which tests ran
    before it on the same worker (pytest-xdist spreads them differently from run to run)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


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
