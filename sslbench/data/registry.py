"""The one dataset table all stages share, and the call that turns a name into a split."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from ..registry import Registry, closest
from .base import SPLITS, DatasetError, LabeledDataset, default_data_root

DATASETS: Registry[Callable[..., LabeledDataset]] = Registry("dataset")


def call_with_options(func: Callable, what: str, *args: Any, **options: Any) -> Any:
    """Call func(*args, **options), refusing an option func does not take with a DatasetError."""
    params = inspect.signature(func).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = list(params)[len(args) :]
        for key in options:
            if key not in accepted:
                raise DatasetError(
                    f"{what} has no option {key!r}{closest(key, accepted)}; "
                    f"options: {', '.join(accepted) or 'none'}"
                )
    return func(*args, **options)


def build_dataset(
    name: str, root: str | Path | None, split: str, transform=None, **options: Any
) -> LabeledDataset:
    """One split of a registered dataset; root=None means `default_data_root() / name`."""
    try:
        factory = DATASETS.get(name)
    except KeyError as err:
        raise DatasetError(err.args[0]) from None
    if split not in SPLITS:
        raise DatasetError(f"dataset {name!r}: unknown split {split!r}; expected one of {SPLITS}")
    root = default_data_root() / name if root is None else Path(root)
    return call_with_options(factory, f"dataset {name!r}", root, split, transform, **options)
