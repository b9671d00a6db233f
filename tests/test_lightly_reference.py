"""sslbench's SimCLR against lightly's NTXentLoss, an independent NT-Xent (its own 2N x (2N-1)
logits built from four blocks), and benchmarks/lightly_step.py at tiny sizes. Skipped without
lightly (the `bench` extra, not installed by CI)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import run_benchmark
from method_checks import SMALL, loss_and_gradient, rel_err, tiny_method, tiny_views

ntx = pytest.importorskip("lightly.loss.ntx_ent_loss")


class LightlySimCLR(torch.nn.Module):
    """A SimCLR method's backbone and projector under lightly's loss, in sslbench's layout (both
    views as one batch of 2N), with the method's parameters in the same order."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method
        self.criterion = ntx.NTXentLoss(temperature=method.cfg.temperature)

    def forward(self, views: list[torch.Tensor]) -> dict:
        z = self.method.projector(self.method.backbone(torch.cat(views)))
        return {"loss": self.criterion(*z.chunk(2))}


@pytest.mark.parametrize("loss_form", ["original", "exact"])
def test_simclr_loss_and_gradient_equal_lightlys_ntxent(loss_form):
    views = tiny_views()
    method = tiny_method("simclr", loss_form=loss_form, **SMALL["simclr"])
    loss, grad = loss_and_gradient(method, views)

    ref = LightlySimCLR(tiny_method("simclr", **SMALL["simclr"]))  # same weights: seeded build
    loss_ref, grad_ref = loss_and_gradient(ref, views)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-12)
    assert rel_err(grad, grad_ref) < 1e-12


def test_lightly_step_benchmark_runs_with_tiny_settings():
    args = ["--batch", "4", "--image-size", "8", "--width", "8", "--repeats", "1", "--warmup", "0"]
    out = run_benchmark("lightly_step.py", *args)
    rows = re.findall(r"^(\w+)\s+(two batches|one batch)\s+[\d.]+\s+[\d.]+\s+([\d.]+)x", out, re.M)
    assert [(name, layout) for name, layout, _ in rows] == [
        ("simclr", "two batches"),
        ("simclr", "one batch"),
        ("byol", "two batches"),
        ("barlow_twins", "two batches"),
        ("vicreg", "two batches"),
    ]
    assert all(float(ratio) > 0 for *_, ratio in rows)
