"""One optimisation step of a method on a fixed global batch, as one process or under torchrun.

Used by the distributed tests: `python tests/dist_step.py OUT [method overrides]` and
`torchrun --nproc_per_node=2 tests/dist_step.py OUT [...]` must write the same loss and the same
updated parameters. Several configs separated by `--next` run one after the other in the same
processes (each from the same seed), so a test module pays the start-up of torchrun once.
Process r takes the r-th contiguous chunk of the global batch (as the engine's sampler does),
BatchNorm runs over the global batch, and DDP (wrapped as the engine wraps it) averages gradients.
`--steps=N` runs N steps on N batches (default 1); every process's buffers come back too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.engine import wrap_ddp
from pretrain.methods import Method, MethodConfig, build_method, method_config_class
from pretrain.methods.base import METHODS, register_method
from sslbench import distributed as D
from sslbench.backbones import build_backbone
from sslbench.config import build_config

GLOBAL_BATCH = 8
IMAGE = 16


@dataclass
class ToyContrastiveConfig(MethodConfig):
    name: str = "toy_contrastive"
    temperature: float = 0.5


class ToyContrastive(Method):
    """InfoNCE of local anchors against all gathered keys: exercises gather_with_grad alone."""

    def __init__(self, backbone, cfg):
        super().__init__(backbone, cfg)
        self.head = torch.nn.Linear(backbone.feature_dim, 8)

    def forward(self, views):
        q, k = (F.normalize(self.head(self.backbone(v)), dim=1) for v in views[:2])
        keys = D.gather_with_grad(k)
        labels = torch.arange(q.shape[0]) + D.rank() * q.shape[0]
        loss = F.cross_entropy(q @ keys.T / self.cfg.temperature, labels)
        return {"loss": loss, "logs": {}, "embeddings": (q.detach(), k.detach())}


if "toy_contrastive" not in METHODS:
    register_method("toy_contrastive", ToyContrastiveConfig)(ToyContrastive)


@dataclass
class HarnessConfig:
    method: Any = None


def main(out: str, args: list[str]) -> None:
    if "--float64" in args:  # where float32 round-off in the gradients exceeds the tolerance
        args = [a for a in args if a != "--float64"]
        torch.set_default_dtype(torch.float64)
    steps = int(next((a.split("=")[1] for a in args if a.startswith("--steps=")), 1))
    args = [a for a in args if not a.startswith("--steps=")]
    configs: list[list[str]] = [[]]
    for arg in args:
        if arg == "--next":
            configs.append([])
        else:
            configs[-1].append(arg)
    env = D.init_distributed("cpu")
    try:
        results = [step(env, overrides, steps) for overrides in configs]
        if env.is_main:
            torch.save(results, out)
    finally:
        D.shutdown()  # after step() returned, so DDP is gone before its process group


def step(env: D.DistEnv, overrides: list[str], steps: int = 1) -> dict:
    torch.manual_seed(0)
    cfg = build_config(HarnessConfig, (), overrides, variants={"method": method_config_class})
    # A 1/16-compute ResNet-18: equality across processes does not depend on the width.
    method = build_method(build_backbone("resnet18", stem="small", width=16), cfg.method)
    if env.world_size > 1:
        method = D.convert_sync_batchnorm(method, env.device)
    gen = torch.Generator().manual_seed(1)
    local = GLOBAL_BATCH // env.world_size
    model = wrap_ddp(method, env.device) if env.world_size > 1 else method
    opt = torch.optim.SGD(method.parameters(), lr=0.5)
    for i in range(steps):
        views = [torch.randn(GLOBAL_BATCH, 3, IMAGE, IMAGE, generator=gen) for _ in range(2)]
        views = [v[env.rank * local : (env.rank + 1) * local] for v in views]
        opt.zero_grad()
        out_dict = model(views)
        out_dict["loss"].backward()
        opt.step()
        method.after_optimizer_step((i + 1) / (2 * steps))
    loss = D.all_reduce_mean(out_dict["loss"].detach())
    return {
        "loss": loss,
        "state": {k: v.clone() for k, v in method.state_dict().items()},
        "buffers_per_rank": {
            k: D.gather_no_grad(v.unsqueeze(0)) for k, v in method.named_buffers()
        },
    }


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
