"""MoCo's dictionary (He et al. 2020, Alg. 1): a FIFO queue of the last `size` keys.

Every process pushes its keys and the queue stores the keys of the *global* batch in rank order,
so all processes hold the same queue and one process with the global batch holds it too. The
keys and the push counter are buffers: they are in the method's state dict, hence in the resume
checkpoint, and a resumed run continues with exactly the queue it was killed with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.distributed import gather_no_grad


class KeyQueue(nn.Module):
    """`size` unit vectors of dimension `dim`, initialised at random as in MoCo's code."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"method.queue_size must be positive, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pushed", torch.zeros((), dtype=torch.long))  # keys pushed so far

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    def fill(self) -> torch.Tensor:
        """Fraction of the queue holding real keys rather than its random initialisation."""
        return self.pushed.clamp(max=self.size).float() / self.size

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue this process's `keys` gathered from all processes, dropping the oldest."""
        keys = gather_no_grad(keys.detach())
        if keys.shape[0] > self.size:
            raise ValueError(
                f"method.queue_size={self.size} is smaller than the {keys.shape[0]} "
                "keys one step pushes (the global batch); raise it"
            )
        slots = (self.pushed + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.pushed += keys.shape[0]
