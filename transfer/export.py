"""Export a backbone artifact to the checkpoint formats of other frameworks.

`sslbench export --to detectron2|torchvision --backbone RUN_DIR [--out PATH]`

- detectron2: a pickle `{"model": {name: numpy array}, "__author__": "sslbench",
  "matching_heuristics": True}` under detectron2's ResNet names (stem.conv1, res2..res5,
  convK.norm, shortcut, shortcut.norm). With matching_heuristics detectron2's checkpointer matches
  names by suffix, so one file serves the FPN backbone (backbone.bottom_up.res5...) and the C4
  head (roi_heads.res5...). Writing a pickle is safe (it is our own numpy data); this module never
  reads one.
- torchvision: a plain state dict for torchvision.models' ResNet of the same depth without
  `fc`, written with torch.save so `torch.load(path, weights_only=True)` reads it.

Both take any ResNet artifact with the ImageNet stem (the manifest's facts say which); the
names come from sslbench/importers/names.py, whose table `sslbench import detectron2` reads
the other way. Only the backbone is exported: an artifact holds no projector or predictor.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import torch

from sslbench.artifact import ArtifactError, backbone_facts, describe_arch, load_backbone
from sslbench.importers.names import to_detectron2
from sslbench.io import atomic_path

FORMATS = ("detectron2", "torchvision")
DEFAULT_FILES = {"detectron2": "backbone.detectron2.pkl", "torchvision": "backbone.torchvision.pth"}
AUTHOR = "sslbench"
COUNTER = "num_batches_tracked"  # BatchNorm's step counter: detectron2 has no use for it


def detectron2_state(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The state dict under detectron2's names, as numpy arrays with the same bits."""
    out = {}
    for key, value in state.items():
        if key.endswith(COUNTER):
            continue
        name = to_detectron2(key)
        if name is None:
            raise ArtifactError(
                f"state-dict key {key!r} is not part of a torchvision ResNet; "
                "cannot name it for detectron2"
            )
        out[name] = value.detach().cpu().numpy().copy()
    return out


def check_exportable(manifest: dict, fmt: str) -> None:
    """Refuse backbones the target framework's ResNet cannot hold, naming what differs."""
    facts = backbone_facts(manifest)
    what = describe_arch(manifest)
    if facts.family != "resnet":
        raise ArtifactError(
            f"cannot export {what} to {fmt}: only ResNets are supported (this "
            f"backbone is a {facts.family})"
        )
    if facts.structure["stem"] != "imagenet":
        raise ArtifactError(
            f"cannot export {what} to {fmt}: its 3x3 'small' stem has no "
            f"counterpart in {fmt}'s ResNet (7x7 conv, stride 2, max-pool)"
        )
    if fmt == "torchvision" and facts.structure["stem_channels"] != 64:
        raise ArtifactError(
            f"cannot export {what} to torchvision: torchvision's ResNets have width 64"
        )


def export_backbone(run_dir: str | Path, fmt: str, path: str | Path | None = None) -> Path:
    """Write the artifact in `run_dir` in format `fmt` (atomically); returns the file's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    backbone, manifest = load_backbone(run_dir)
    check_exportable(manifest, fmt)
    path = Path(path) if path is not None else Path(run_dir) / DEFAULT_FILES[fmt]
    state = backbone.state_dict()
    with atomic_path(path) as tmp:
        if fmt == "detectron2":
            blob = {
                "model": detectron2_state(state),
                "__author__": AUTHOR,
                "matching_heuristics": True,
            }
            with open(tmp, "wb") as f:
                pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    return path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, choices=FORMATS, dest="fmt", help="target framework")
    parser.add_argument(
        "--backbone",
        required=True,
        metavar="RUN_DIR",
        help="run directory holding backbone.safetensors and backbone.json",
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help=f"output file (default: RUN_DIR/{DEFAULT_FILES['detectron2']} or "
        f"RUN_DIR/{DEFAULT_FILES['torchvision']})",
    )


def run(args: argparse.Namespace) -> int:
    path = export_backbone(args.backbone, args.fmt, args.out)
    print(path)
    return 0
