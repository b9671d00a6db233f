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


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A tiny synthetic-shapes set generated once per test session."""
    from helpers import TINY_SHAPES

    from sslbench.data import prepare_synthetic_shapes

    root = tmp_path_factory.mktemp("synthetic-shapes")
    prepare_synthetic_shapes(root, seed=0, progress=False, **TINY_SHAPES)
    return root


@pytest.fixture(scope="session")
def knn_shapes_root(tmp_path_factory):
    """TINY_SHAPES' train split with 1,600 test images: the kNN bank and queries of smoke claims."""
    from helpers import KNN_SHAPES

    from sslbench.data import prepare_synthetic_shapes

    root = tmp_path_factory.mktemp("synthetic-shapes-knn")
    prepare_synthetic_shapes(root, seed=0, progress=False, **KNN_SHAPES)
    return root
