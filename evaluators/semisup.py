"""Semi-supervised evaluation: fine-tune the whole network on 1% or 10% of the training labels.

The labelled subset is either drawn class-balanced from the run seed (the same seed always gives
the same files) or read from a SimCLR-format split file (one image file name per line, as in
SimCLR's 1percent.txt / 10percent.txt), so the ImageNet numbers use the subsets papers use. A
class left without a labelled sample is an error naming the class: dropping it silently would
change the task. The backbone and the new head get separate learning rates.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from sslbench import distributed as D
from sslbench.artifact import input_normalization
from sslbench.config import to_dict
from sslbench.data import DatasetError, LabeledDataset
from sslbench.io import sha256_file
from sslbench.optim import build_optimizer, param_groups, scaled_lr
from sslbench.results import HITS_KEY, TaskOutput, pack_hits

from .context import EvalContext
from .training import Classifier, SeededAugmentation, fit, train_transform, val_test_scores


class SubsetError(DatasetError):
    """A labelled subset that cannot be drawn or read as asked."""


def _check_every_class(dataset: LabeledDataset, indices: np.ndarray, source: str) -> None:
    present = set(np.asarray(dataset.targets)[indices].tolist())
    missing = [name for label, name in enumerate(dataset.classes) if label not in present]
    if missing:
        raise SubsetError(
            f"{source}: no labelled sample of class {', '.join(map(repr, missing))} "
            f"in {dataset.name}/{dataset.split}"
        )


def balanced_subset(dataset: LabeledDataset, fraction: float, seed: int) -> np.ndarray:
    """round(fraction * N / classes) samples of every class (at least 1), chosen by `seed`;
    sorted dataset indices."""
    if not 0 < fraction <= 1:
        raise SubsetError(f"semisup.fraction must be in (0, 1], got {fraction}")
    targets = np.asarray(dataset.targets)
    per_class = max(1, round(fraction * len(targets) / dataset.num_classes))
    rng = np.random.default_rng(seed)
    chosen = []
    for label, name in enumerate(dataset.classes):
        members = np.flatnonzero(targets == label)
        if len(members) < per_class:
            raise SubsetError(
                f"class {name!r} has {len(members)} samples in {dataset.name}/"
                f"{dataset.split}, fewer than the {per_class} per class that "
                f"semisup.fraction={fraction} asks for"
            )
        chosen.append(rng.choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def read_split_file(path: str | Path, dataset: LabeledDataset) -> np.ndarray:
    """Indices of the files a SimCLR-format split file lists; sorted.

    A line matches a dataset file by its relative path (e.g. "n01440764/x.JPEG") or, when that
    is unique, by its base name ("x.JPEG", the SimCLR form). Unknown, ambiguous or repeated
    lines are errors naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SubsetError(f"semisup.split_file {path} not found")
    if dataset.files is None:
        raise SubsetError(
            f"semisup.split_file needs a dataset with image files; {dataset.name} "
            "is held in memory (use semisup.fraction instead)"
        )
    by_path = {file: i for i, file in enumerate(dataset.files)}
    by_name = defaultdict(list)
    for i, file in enumerate(dataset.files):
        by_name[Path(file).name].append(i)
    chosen: dict[int, int] = {}  # dataset index -> line number
    unknown = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate((raw.strip() for raw in lines), start=1):
        if not line:
            continue
        if line in by_path:
            index = by_path[line]
        elif len(by_name.get(line, ())) == 1:
            index = by_name[line][0]
        elif line in by_name:
            raise SubsetError(
                f"{path}:{number}: {line!r} matches {len(by_name[line])} files of "
                f"{dataset.name}/{dataset.split}; list it by its path relative to "
                "the split directory (class/file)"
            )
        else:
            unknown.append(f"{number}: {line}")
            continue
        if index in chosen:
            raise SubsetError(f"{path}:{number}: {line!r} repeats line {chosen[index]}")
        chosen[index] = number
    if unknown:
        raise SubsetError(
            f"{path}: {len(unknown)} lines name no file of {dataset.name}/"
            f"{dataset.split} (first: {'; '.join(unknown[:3])})"
        )
    indices = np.array(sorted(chosen), dtype=np.int64)
    if len(indices) == 0:
        raise SubsetError(f"{path}: lists no files")
    _check_every_class(dataset, indices, str(path))
    return indices


def labelled_indices(
    dataset: LabeledDataset, fraction: float, split_file: str | None, seed: int
) -> np.ndarray:
    if split_file is not None:
        return read_split_file(split_file, dataset)
    return balanced_subset(dataset, fraction, seed)


def run(ctx: EvalContext) -> TaskOutput | None:
    cfg, run_cfg = ctx.cfg.semisup, ctx.cfg.run
    if cfg.head_lr <= 0 or cfg.backbone_lr < 0:
        raise ValueError(
            f"semisup.head_lr must be > 0 and semisup.backbone_lr >= 0, got "
            f"{cfg.head_lr} and {cfg.backbone_lr}"
        )
    indices = labelled_indices(ctx.datasets["train"], cfg.fraction, cfg.split_file, run_cfg.seed)
    labelled = SeededAugmentation(
        ctx.datasets["train"],
        train_transform(
            ctx.cfg.data.image_size, cfg.crop_min_scale, *input_normalization(ctx.manifest)
        ),
        run_cfg.seed,
        indices,
    )
    torch.manual_seed(run_cfg.seed)
    model = Classifier(ctx.backbone, ctx.num_classes, frozen=False)
    if D.world_size() > 1:
        model = D.convert_sync_batchnorm(model, ctx.device)
    model.to(ctx.device)
    lr = scaled_lr(cfg.head_lr, cfg.batch_size)
    groups = param_groups(
        model,
        cfg.weight_decay,
        overrides={"backbone.": {"lr_scale": cfg.backbone_lr / cfg.head_lr}},
    )
    optimizer = build_optimizer(cfg.optimizer, groups, lr, cfg.momentum, cfg.weight_decay)
    protocol = to_dict(cfg)
    if cfg.split_file is None:
        protocol.pop("split_file")
    else:  # the file's content defines the subset, not where it lies
        protocol.pop("fraction")
        protocol["split_file"] = {
            "name": Path(cfg.split_file).name,
            "sha256": sha256_file(cfg.split_file),
        }
    loss = fit(
        model,
        labelled,
        optimizer,
        lr,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        warmup_epochs=cfg.warmup_epochs,
        seed=run_cfg.seed,
        device=ctx.device,
        num_workers=ctx.cfg.data.num_workers,
        progress=run_cfg.progress,
        desc=f"semisup fine-tune ({len(indices)} labels)",
        resume=ctx.resume_state({"semisup": protocol}),
    )
    scores = val_test_scores(model, ctx)
    if scores is None:  # not the main process
        return None
    metrics, test_hits = scores
    counts = np.bincount(
        np.asarray(ctx.datasets["train"].targets)[indices], minlength=ctx.num_classes
    )
    details = {
        "labelled_per_class": dict(zip(ctx.datasets["train"].classes, counts.tolist())),
        "lr": {"head": lr, "backbone": lr * cfg.backbone_lr / cfg.head_lr},
        "final_train_loss": loss,
        HITS_KEY: pack_hits(test_hits),
    }
    return TaskOutput(metrics, {"semisup": protocol}, details, {"labelled": len(indices)})
