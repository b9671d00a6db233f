"""The backbone artifact (DESIGN.md contract 1): what pretraining writes and every evaluator reads.

A run directory holds `backbone.safetensors` (weights only; loading it cannot run code) and
`backbone.json` (the manifest: architecture and its arguments, how the weights were made, and
their sha256). `load_backbone` rebuilds the network from the manifest alone and refuses weights
whose hash or shapes do not match it.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .backbones import BACKBONES, build_backbone
from .io import atomic_path, sha256_file, write_json_atomic

FORMAT = "sslbench.backbone"
FORMAT_VERSION = 1
WEIGHTS_FILE = "backbone.safetensors"
MANIFEST_FILE = "backbone.json"
REQUIRED_KEYS = ("format", "format_version", "arch", "arch_kwargs", "feature_dim", "method",
                 "weights_sha256")


class ArtifactError(ValueError):
    """A backbone artifact that is missing, inconsistent, or of the wrong architecture."""


def save_backbone(run_dir: str | Path, backbone: nn.Module, *, arch: str, arch_kwargs: dict,
                  method: str, **provenance: Any) -> Path:
    """Write weights then manifest (each atomically); the manifest's presence marks completion.

    `provenance` holds the rest of the manifest: config, config_hash, dataset, epochs, steps,
    seed, diagnostics.
    """
    run_dir = Path(run_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    weights = run_dir / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        # One metadata key: safetensors writes a map's keys in a per-process order, so two would
        # make bit-identical weights hash differently. The architecture lives in the manifest.
        save_file(state, str(tmp), metadata={"format": FORMAT})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "feature_dim": int(backbone.feature_dim),
        "method": method,
        "weights_sha256": sha256_file(weights),
        "code_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance,
    }
    write_json_atomic(run_dir / MANIFEST_FILE, manifest)
    return run_dir


def read_manifest(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST_FILE
    if not run_dir.is_dir():
        raise ArtifactError(f"backbone artifact {run_dir}: expected a run directory holding "
                            f"{MANIFEST_FILE} and {WEIGHTS_FILE}")
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {run_dir} holds no finished backbone "
                            "(did pretraining complete?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    if manifest["format"] != FORMAT:
        raise ArtifactError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest['format_version']} is newer than "
                            f"this sslbench reads ({FORMAT_VERSION}); upgrade sslbench")
    if manifest["arch"] not in BACKBONES:
        raise ArtifactError(f"{path}: unknown architecture {manifest['arch']!r}; "
                            f"known: {BACKBONES.names()}")
    return manifest


def load_backbone(run_dir: str | Path, expected_arch: str | None = None,
                  map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the backbone from the manifest and load its verified weights (strictly)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if expected_arch is not None and manifest["arch"] != expected_arch:
        raise ArtifactError(f"{run_dir}: backbone is {manifest['arch']}, but this task needs "
                            f"{expected_arch}")
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} not found (the manifest exists, the weights do not)")
    digest = sha256_file(weights)
    if digest != manifest["weights_sha256"]:
        raise ArtifactError(f"{weights}: sha256 {digest[:12]}… does not match the manifest's "
                            f"{manifest['weights_sha256'][:12]}…; the file was changed or "
                            "truncated")
    model = build_backbone(manifest["arch"], **manifest["arch_kwargs"])
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as err:  # safetensors raises its own error types
        raise ArtifactError(f"{weights}: not a readable safetensors file ({err})") from None
    load_state_strict(model, state, f"{weights} into {describe_arch(manifest)}")
    return model, manifest


def describe_arch(manifest: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in sorted(manifest["arch_kwargs"].items()))
    return f"{manifest['arch']}({args})"


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that reports every missing, unexpected and mis-shaped key at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise ArtifactError(f"cannot load {what}: architecture mismatch ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
