"""Two processes (gloo, CPU) give the same loss and update as one process with the global batch."""

import pytest
from distributed import assert_same_step

pytestmark = pytest.mark.distributed


def test_simsiam_two_processes_match_one(tmp_path):
    assert_same_step(
        tmp_path,
        [
            "method.name=simsiam",
            "method.proj_hidden_dim=32",
            "method.out_dim=16",
            "method.pred_hidden_dim=8",
        ],
    )


def test_gather_with_grad_two_processes_match_one(tmp_path):
    assert_same_step(tmp_path, ["method.name=toy_contrastive"])
