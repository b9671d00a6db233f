"""The backbone artifact (docs/design.md, contract 1): what pretraining writes, every task reads.

A run directory holds `backbone.safetensors` (weights only; loading it cannot run code) and
`backbone.json` (the manifest: architecture and its arguments, the backbone's facts (feature
width, stages, family structure), the input normalisation its weights expect, how the weights
were made, and their sha256). `load_backbone` rebuilds the network from the manifest alone and
refuses weights whose hash or shapes do not match it.

Format version 2 added "structure" and "normalize"; a version-1 manifest still loads, with the
facts read from the rebuilt architecture and the ImageNet normalisation every v1 backbone used.
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
from .backbones import BackboneFacts, build_backbone, constructor
from .io import atomic_path, sha256_file, write_json_atomic
from .transforms import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "sslbench.backbone"
FORMAT_VERSION = 2
WEIGHTS_FILE = "backbone.safetensors"
MANIFEST_FILE = "backbone.json"
REQUIRED_KEYS = (
    "format",
    "format_version",
    "arch",
    "arch_kwargs",
    "feature_dim",
    "method",
    "weights_sha256",
)


class ArtifactError(ValueError):
    """A backbone artifact that is missing, inconsistent, or of the wrong architecture."""


def save_backbone(
    run_dir: str | Path,
    backbone: nn.Module,
    *,
    arch: str,
    arch_kwargs: dict,
    method: str,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    **provenance: Any,
) -> Path:
    """Write weights then manifest (each atomically); the manifest's presence marks completion.

    mean/std: the input normalisation the weights expect (of [0, 1] RGB). `provenance` holds the
    rest of the manifest: config, config_hash, dataset, epochs, steps, seed, diagnostics; or, for
    an imported checkpoint, `imported` and `source`.
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
        "structure": backbone.facts.to_dict(),
        "normalize": {"mean": [float(m) for m in mean], "std": [float(v) for v in std]},
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
        raise ArtifactError(
            f"backbone artifact {run_dir}: expected a run directory holding "
            f"{MANIFEST_FILE} and {WEIGHTS_FILE}"
        )
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: {run_dir} holds no finished backbone (did pretraining complete?)"
        )
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
        raise ArtifactError(
            f"{path}: format version {manifest['format_version']} is newer than "
            f"this sslbench reads ({FORMAT_VERSION}); upgrade sslbench"
        )
    try:
        constructor(manifest["arch"])
    except KeyError as err:  # its message names the closest known architecture
        raise ArtifactError(f"{path}: {err.args[0]}") from None
    manifest.setdefault("structure", backbone_facts(manifest).to_dict())
    manifest.setdefault("normalize", {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)})
    return manifest


def backbone_facts(manifest: dict) -> BackboneFacts:
    """What the manifest's backbone is: its recorded facts, or for a manifest without them
    (format version 1), those of its architecture built on the meta device (no memory)."""
    if "structure" in manifest:
        return BackboneFacts.from_dict(manifest["structure"])
    with torch.device("meta"):
        return build_backbone(manifest["arch"], **manifest["arch_kwargs"]).facts


def input_normalization(manifest: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of [0, 1] RGB input the backbone expects; ImageNet's when not recorded."""
    entry = manifest.get("normalize") or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    return tuple(entry["mean"]), tuple(entry["std"])


def load_backbone(
    run_dir: str | Path, expected_arch: str | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the backbone from the manifest and load its verified weights (strictly)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if expected_arch is not None and manifest["arch"] != expected_arch:
        raise ArtifactError(
            f"{run_dir}: backbone is {manifest['arch']}, but this task needs {expected_arch}"
        )
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{weights} not found (the manifest exists, the weights do not)")
    digest = sha256_file(weights)
    if digest != manifest["weights_sha256"]:
        raise ArtifactError(
            f"{weights}: sha256 {digest[:12]}… does not match the manifest's "
            f"{manifest['weights_sha256'][:12]}…; the file was changed or "
            "truncated"
        )
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
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", shapes),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (f", … ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise ArtifactError(f"cannot load {what}: architecture mismatch ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)
