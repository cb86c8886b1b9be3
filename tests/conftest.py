"""Shared test set-up: one torch thread per test process (tests run two at a time on a 2-core CI machine)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
