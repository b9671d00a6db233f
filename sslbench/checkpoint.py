"""Resume checkpoints: plain tensors and containers only, loaded with weights_only=True.

Everything a run needs to continue bit-exactly (method state incl. EMA target, queue or
correlation buffers; optimizer; step; the random number generators' states) is a tensor or a
builtin, so loading a checkpoint never unpickles arbitrary objects. A checkpoint is written
beside the old one and renamed over it, so a write that fails (a full disk) leaves the previous
checkpoint as it was.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be written, loaded safely, or does not belong to this run."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
    except OSError as err:
        kept = "is unchanged" if path.is_file() else "does not exist yet"
        raise CheckpointError(
            f"could not write checkpoint {path} ({err.strerror or err}); the "
            f"previous checkpoint {kept}"
        ) from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = next(
            (ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else ""
        )
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True rejected it: {first}). sslbench never unpickles arbitrary "
            "objects; convert the file to a state dict of tensors or safetensors."
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None


def require_same_recipe(where: str | Path, found: str | None, key: str, remedy: str) -> None:
    """A CheckpointError unless the checkpoint at `where` was written under recipe key `key`:
    continuing another recipe's run would silently mix two configurations. `remedy` names what
    to delete; the message also offers another run.work_dir."""
    if found != key:
        raise CheckpointError(
            f"{where} holds an unfinished run of another recipe (config hash "
            f"{str(found)[:12]}... vs {key[:12]}...); {remedy}, or give this run another "
            "run.work_dir"
        )


def require_same_world_size(path: str | Path, saved: int, now: int) -> None:
    """A CheckpointError unless a run saved by `saved` processes continues on as many: each
    process restores its own random state, so another count cannot continue bit-exactly."""
    if saved != now:
        raise CheckpointError(
            f"{path} was saved by {saved} processes; continue it with as many, not {now}"
        )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """torch's generator states a resume restores: the CPU's, and `device`'s when it is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Set the generators `rng_state` saved (a CUDA state only on a GPU run that saved one)."""
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
