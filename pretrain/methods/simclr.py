"""SimCLR (Chen et al. 2020) and the duality variants SimCLR-abs / SimCLR-sq (Garrido et al. 2023).

NT-Xent over the 2N views of the global batch: each view is an anchor whose positive is the
other view of its image; every other view is a negative, the anchor itself is masked out
(ℓ(i,j) of the paper, averaged over all 2N anchors). Both views go through the encoder as one
batch of 2N, as in the official code, so BatchNorm sees both. That layout, not the loss, is why
the step is slower on one CPU thread than lightly's, which forwards each view as its own batch
(larger activations fall out of cache and are freshly mapped by malloc every step); against lightly
in this layout the step is even (benchmarks/lightly_step.py).

Across processes the keys are gathered *with* gradient and the loss is averaged over the local
anchors, so DDP's averaging yields exactly the global-batch gradient.

The method name picks the similarity of the negatives (contrastive.py): `simclr` (cosine),
`simclr_abs` (|cosine|), `simclr_sq` (cosine²).

`momentum_encoder: true` takes the keys from an EMA copy of backbone + projector; the anchor's
own momentum key stays masked, so the loss is still "every other view is a negative", and the
keys carry no gradient. `loss_form: unigrad` is UniGrad's contrastive form (contrastive.py); the
duality variants have none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sslbench import distributed as D

from ..heads import build_mlp
from .base import MethodConfig, register_method
from .contrastive import ContrastiveForm, ContrastiveMethod
from .siamese import upcast

SIMILARITY_OF = {"simclr": "dot", "simclr_abs": "abs", "simclr_sq": "sq"}


@dataclass
class SimCLRConfig(MethodConfig):
    name: str = "simclr"
    proj_hidden_dim: int = 2048  # 2048→2048 (BN, ReLU)→128 (BN), the paper's head
    proj_layers: int = 2
    out_dim: int = 128
    temperature: float = 0.1
    unigrad: ContrastiveForm = field(default_factory=ContrastiveForm)


@dataclass
class SimCLRAbsConfig(SimCLRConfig):
    name: str = "simclr_abs"


@dataclass
class SimCLRSqConfig(SimCLRConfig):
    name: str = "simclr_sq"


def simclr_pairs(
    n: int, rank: int, total: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive index and self mask of local anchors [view 1; view 2] (2n of them) among
    `total` keys gathered in rank order, each process contributing its own [view 1; view 2]."""
    local = torch.arange(2 * n, device=device)
    offset = rank * 2 * n
    pos = offset + (local + n) % (2 * n)
    return pos, (offset + local)[:, None] == torch.arange(total, device=device)  # no host sync


class SimCLR(ContrastiveMethod):
    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig):
        super().__init__(backbone, cfg)
        self.similarity = SIMILARITY_OF[cfg.name]

    def build_projector(self, in_dim: int) -> nn.Module:
        cfg = self.cfg
        return build_mlp(in_dim, cfg.proj_hidden_dim, cfg.out_dim, cfg.proj_layers, last_bn=True)

    def loss_forward(self, views: list[torch.Tensor]) -> dict:
        n = views[0].shape[0]
        x = torch.cat(views[:2])
        z = upcast(self.projector(self.backbone(x)))
        u = F.normalize(z, dim=1)
        if self.target is None:
            keys = D.gather_with_grad(u)
        else:
            keys = D.gather_no_grad(F.normalize(upcast(self.target(x)), dim=1))
        pos, exclude = simclr_pairs(n, D.rank(), keys.shape[0], u.device)
        loss, logs = self.infonce(u, keys, pos, self.similarity, exclude)
        z = z.detach()
        return {"loss": loss, "logs": logs, "embeddings": (z[:n], z[n:])}


for _config in (SimCLRConfig, SimCLRAbsConfig, SimCLRSqConfig):
    register_method(_config.name, _config)(SimCLR)
