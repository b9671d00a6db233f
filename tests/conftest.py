"""Shared test set-up: one torch thread (two shared cores; measured faster than two under load)."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def rng_seed():
    torch.manual_seed(0)
    return 0
