"""MoCo v2 (Chen et al. 2020b) with its queue, and MoCo v3 (Chen, Xie & He 2021) with in-batch keys.

Both encode the keys with a momentum (EMA) copy of backbone + projector. With
`momentum_encoder: false` no copy exists and the keys are sg(online encoder) instead.
`loss_form: unigrad` is UniGrad's contrastive form (contrastive.py), without MoCo v2's queue and
MoCo v3's predictor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from ..queue import KeyQueue
from .base import MethodConfig, register_method
from .contrastive import ContrastiveForm, ContrastiveMethod, mean_logs
from .siamese import upcast


def _has_global_bn(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.SyncBatchNorm, D.CrossProcessBatchNorm)) for m in module.modules())


@torch.no_grad()
def shuffle_bn_forward(
    encoder: nn.Module, x: torch.Tensor, seed: int | torch.Tensor
) -> torch.Tensor:
    """MoCo's shuffle-BN (He et al. 2020, §3.3): encode the keys of a random permutation of the
    global batch, so a query and its key are not normalised with the same batch statistics.

    It is a no-op on one process (there is no other sub-batch to shuffle into) and where the
    encoder's BatchNorm already normalises over the global batch (SyncBN, `train.sync_bn`), whose
    statistics no permutation changes. The permutation is seeded by `seed`, the same on every
    process, instead of being drawn on rank 0 and broadcast; a tensor seed is read (a host sync)
    only when there is something to shuffle.
    """
    if D.world_size() == 1 or _has_global_bn(encoder):
        return encoder(x)
    n, rank = x.shape[0], D.rank()
    everything = D.gather_no_grad(x)
    perm = torch.randperm(everything.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    perm = perm.to(x.device)
    encoded = D.gather_no_grad(encoder(everything[perm[rank * n : (rank + 1) * n]]))
    return encoded[torch.argsort(perm)][rank * n : (rank + 1) * n]


@dataclass
class MoCoV2Config(MethodConfig):
    name: str = "mocov2"
    momentum_encoder: bool = True
    base_momentum: float = 0.999
    momentum_schedule: str = "constant"
    proj_hidden_dim: int = 2048  # 2048→2048 (ReLU)→128, no BN
    proj_layers: int = 2
    out_dim: int = 128
    temperature: float = 0.2
    queue_size: int = 65536
    symmetric: bool = False  # official: asymmetric; SimSiam's reproduction symmetrises
    unigrad: ContrastiveForm = field(default_factory=ContrastiveForm)


@register_method("mocov2", MoCoV2Config)
class MoCoV2(ContrastiveMethod):
    """logits = [q·k₊, q·queueᵀ]/T, cross-entropy with the positive; the gathered keys are
    enqueued after the loss. Symmetric: ½[ctr(q1, k2) + ctr(q2, k1)], both views' keys enqueued.
    Returned embeddings are (online z1, z2), where z2 is the key encoder's when asymmetric."""

    def __init__(self, backbone: nn.Module, cfg: MoCoV2Config):
        super().__init__(backbone, cfg)
        if not self.unigrad_form:
            self.queue = KeyQueue(cfg.queue_size, cfg.out_dim)

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(in_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers, hidden_bn=False)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.target if self.target is not None else self._online()
        return upcast(shuffle_bn_forward(encoder, x, self.queue.pushed))

    def _ctr(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, dict]:
        n = q.shape[0]
        keys = torch.cat([k, self.queue.keys])
        pos = torch.arange(n, device=q.device)
        in_batch = torch.zeros(n, keys.shape[0], dtype=torch.bool, device=q.device)
        in_batch[:, :n] = ~torch.eye(n, dtype=torch.bool, device=q.device)  # not negatives
        return self.infonce(q, keys, pos, exclude=in_batch)

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        x1, x2 = views[:2]
        z1 = upcast(self.projector(self.backbone(x1)))
        k2 = self._keys(x2)
        loss, logs = self._ctr(F.normalize(z1, dim=1), F.normalize(k2, dim=1))
        pushed = [k2]
        z2 = k2
        if self.cfg.symmetric:
            z2 = upcast(self.projector(self.backbone(x2)))
            k1 = self._keys(x1)
            loss2, logs2 = self._ctr(F.normalize(z2, dim=1), F.normalize(k1, dim=1))
            loss, logs = (loss + loss2) / 2, mean_logs(logs, logs2)
            pushed.append(k1)
        for k in pushed:
            self.queue.push(F.normalize(k, dim=1))
        logs["queue_fill"] = self.queue.fill()
        return {"loss": loss, "logs": logs, "embeddings": (z1.detach(), z2.detach())}


@dataclass
class MoCoV3Config(MethodConfig):
    name: str = "mocov3"
    momentum_encoder: bool = True
    base_momentum: float = 0.99
    momentum_schedule: str = "cosine"
    proj_hidden_dim: int = 4096  # 2048→4096 (BN, ReLU)→256→BN(no affine)
    proj_layers: int = 2
    out_dim: int = 256
    pred_hidden_dim: int = 4096  # 256→4096 (BN, ReLU)→256
    temperature: float = 1.0
    unigrad: ContrastiveForm = field(default_factory=ContrastiveForm)


@register_method("mocov3", MoCoV3Config)
class MoCoV3(ContrastiveMethod):
    """L = ctr(q1, k2) + ctr(q2, k1), ctr(q, k) = 2T·CE(q̂·k̂_allᵀ/T, own index): q from the
    predictor, k from the momentum encoder, negatives the other keys of the global batch.
    Without momentum encoder the keys are sg(online projector output)."""

    def __init__(self, backbone: nn.Module, cfg: MoCoV3Config):
        super().__init__(backbone, cfg)
        if not self.unigrad_form:
            self.predictor = build_mlp(
                cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim, 2, last_bias=False
            )

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(
            in_dim,
            cfg.proj_hidden_dim,
            cfg.out_dim,
            cfg.proj_layers,
            last_bn=True,
            last_bn_affine=False,
        )

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        z = [upcast(zi) for zi in self.embed(views)]
        q = [F.normalize(upcast(self.predictor(zi)), dim=1) for zi in z]
        keys = [D.gather_no_grad(F.normalize(upcast(t), dim=1)) for t in self.targets(views, z)]
        n, t = q[0].shape[0], self.cfg.temperature
        pos = torch.arange(n, device=q[0].device) + D.rank() * n
        (l12, logs12) = self.infonce(q[0], keys[1], pos)
        (l21, logs21) = self.infonce(q[1], keys[0], pos)
        return {
            "loss": 2 * t * (l12 + l21),
            "logs": mean_logs(logs12, logs21),
            "embeddings": (z[0].detach(), z[1].detach()),
        }
