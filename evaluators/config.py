"""The evaluation config schemas: every key an eval recipe YAML may set, with its default.

Defaults are the small synthetic-shapes CPU recipes (configs/eval/knn.yaml, linear_fast.yaml,
linear_standard.yaml for probe.name=standard, semisup_10pct.yaml); configs/eval/ also holds
the ImageNet ones. Each task has its own schema, so a linear-probe key given to the
kNN evaluator is an unknown-key error rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from sslbench.config import build_config


@dataclass
class RunConfig:
    seed: int = 0  # classifier init, data order, and the semi-supervised subset draw
    device: str = "auto"
    threads: Optional[int] = None  # torch and faiss CPU threads; None leaves the default
    progress: bool = True
    # Standard probe and semisup: steps between resume checkpoints (and one when training ends)
    # under RESULTS_DIR/.work/; 0: none. Not part of the protocol: it never changes the number.
    checkpoint_every: int = 500


@dataclass
class DataConfig:
    name: str = "synthetic-shapes"
    root: Optional[str] = None
    image_size: int = 16  # the synthetic pretraining recipes' crop size
    num_workers: int = 0
    # Passed to the dataset builder. The default is the data the synthetic pretraining recipes
    # generate (silhouettes), so both find the same default root; `data.options=null` drops it
    # for another dataset (data.name=digits data.options=null).
    options: Optional[Dict[str, Any]] = field(default_factory=lambda: {"style": "silhouette"})


@dataclass
class FeaturesConfig:
    batch_size: int = 256
    cache: bool = True
    cache_dir: Optional[str] = None  # None: $SSLBENCH_CACHE, else <results dir>/.feature_cache


@dataclass
class KnnConfig:
    k: List[int] = field(default_factory=lambda: [10, 20, 100, 200])
    temperature: List[float] = field(default_factory=lambda: [0.07])
    index: str = "flat"  # "flat" (exact) or "ivf" (approximate, for very large banks)
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    chunk_size: int = 4096  # queries searched at once: bounds memory, not the result
    # auto: faiss on the CPU, chunked matmul + top-k in torch on a GPU (no faiss-gpu needed);
    # faiss: faiss everywhere (on the GPU where faiss-gpu is installed); torch: torch everywhere
    backend: str = "auto"


@dataclass
class FastProbeConfig:
    """Logistic regression on cached, standardised features; (lr, weight_decay) chosen on val."""

    name: str = "fast"
    solver: str = "lbfgs"  # "lbfgs" (full batch) or "sgd" (mini-batch, for banks too big)
    lr: List[float] = field(default_factory=lambda: [1.0])
    weight_decay: List[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2])
    max_iter: int = 500  # lbfgs iterations
    epochs: int = 100  # sgd
    batch_size: int = 1024  # sgd


@dataclass
class StandardProbeConfig:
    """A linear layer on the frozen backbone (BN in eval mode), trained on augmented images."""

    name: str = "standard"
    optimizer: str = "sgd"  # "sgd" or "lars"
    base_lr: float = 0.5  # scaled by batch_size / 256
    batch_size: int = 256  # global, over all processes
    epochs: int = 20
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    crop_min_scale: float = 0.08


@dataclass
class SemisupConfig:
    """Fine-tune the whole network on a labelled subset, with separate backbone and head lr."""

    fraction: float = 0.1  # labelled samples per class = round(fraction * N / classes)
    split_file: Optional[str] = None  # SimCLR-format list of image file names; overrides fraction
    optimizer: str = "sgd"
    backbone_lr: float = 0.01  # both scaled by batch_size / 256
    head_lr: float = 0.1
    batch_size: int = 64
    epochs: int = 20
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    crop_min_scale: float = 0.08


@dataclass
class KnnEvalConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)


@dataclass
class LinearEvalConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    probe: Any = field(default_factory=FastProbeConfig)  # or StandardProbeConfig, by probe.name


@dataclass
class SemisupEvalConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)  # batch size for evaluation
    semisup: SemisupConfig = field(default_factory=SemisupConfig)


PROBES = {"fast": FastProbeConfig, "standard": StandardProbeConfig}


def _probe_class(name: str) -> type:
    if name not in PROBES:
        raise KeyError(f"unknown linear probe {name!r}; known: {', '.join(PROBES)}")
    return PROBES[name]


def knn_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    return build_config(KnnEvalConfig, paths, overrides)


def linear_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    return build_config(LinearEvalConfig, paths, overrides, variants={"probe": _probe_class})


def semisup_config(paths: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> DictConfig:
    return build_config(SemisupEvalConfig, paths, overrides)
