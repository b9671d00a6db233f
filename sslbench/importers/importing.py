"""`import_checkpoint`: another codebase's checkpoint -> a backbone artifact, strictly.

Strict means: every tensor of the architecture is found under the layout's namespace with its
exact shape (only BatchNorm's `num_batches_tracked` counter, which sources such as detectron2
drop and no forward reads, may be absent: it is set to 0 and reported); the namespace is
removed as an exact prefix; a key inside the namespace that is neither the architecture's nor
its classifier slot's is an error; everything else in the file is dropped and reported by
group. A wrong architecture fails on the first tensor whose shape differs, naming both shapes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..artifact import MANIFEST_FILE, ArtifactError, save_backbone
from ..backbones import build_backbone
from ..io import sha256_file
from ..registry import closest
from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .formats import ALIASES, FORMATS, Format, Layout
from .reading import read_checkpoint

AUTO = "auto"
COUNTER = "num_batches_tracked"


class CheckpointImportError(ArtifactError):
    """A checkpoint that does not hold the asked-for backbone in the asked-for layout."""


@dataclass(frozen=True)
class Extraction:
    """The backbone found in a file: its tensors under the architecture's names, and the rest."""

    state: dict[str, torch.Tensor]
    dropped: dict[str, int]  # group label -> tensor count
    filled: list[str]  # BatchNorm counters absent from the file, set to 0


@dataclass(frozen=True)
class ImportReport:
    run_dir: Path
    fmt: str
    namespace: str
    variant: str
    arch: str
    arch_kwargs: dict[str, Any]
    method: str
    method_inferred: bool
    tensors: int
    parameters: int
    dropped: dict[str, int]
    filled: int
    auto: str = ""  # how `auto` decided, when it did

    def lines(self) -> list[str]:
        chosen = f"{self.fmt}" + (f" ({self.variant})" if self.variant else "")
        out = [f"format: {chosen}, backbone tensors under {self.namespace or '(top level)'!r}"]
        if self.auto:
            out.append(f"auto: {self.auto}")
        out.append(
            f"backbone: {self.arch}, {self.tensors} tensors, {self.parameters:,} "
            "parameters"
            + (f"; {self.filled} BatchNorm counters absent, set to 0" if self.filled else "")
        )
        dropped = ", ".join(f"{label} ({n})" for label, n in self.dropped.items())
        out.append(f"dropped: {dropped or 'nothing'}")
        out.append(f"method: {self.method} ({'inferred' if self.method_inferred else 'given'})")
        out.append(f"wrote {self.run_dir}")
        return out


def get_format(name: str) -> Format:
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        known = ", ".join([AUTO, *FORMATS, *ALIASES])
        raise CheckpointImportError(
            f"unknown checkpoint format {name!r}{closest(name, [AUTO, *FORMATS])}; known: {known}"
        )
    return FORMATS[name]


def flatten(obj: Any, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor (or numpy array) in nested mappings, by dotted path from the root."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[path] = obj
    elif isinstance(obj, np.ndarray) and obj.dtype != object:
        out[path] = torch.from_numpy(np.array(obj, order="C"))  # a copy, 0-d kept 0-d
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            inner = flatten(value, f"{path}.{key}" if path else str(key))
            clash = inner.keys() & out.keys()
            if clash:
                raise CheckpointImportError(f"two entries of the file flatten to {min(clash)!r}")
            out.update(inner)
    return out


def present_paths(obj: Any, path: str = "") -> set[str]:
    """Every key path in nested mappings (for format signatures), tensors or not."""
    out = set()
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            inner = f"{path}.{key}" if path else str(key)
            out.add(inner)
            out |= present_paths(value, inner)
    return out


def _renamed(fmt: Format, key: str) -> str | None:
    return fmt.rename(key) if fmt.rename else key


def hits(
    tensors: Mapping[str, torch.Tensor],
    fmt: Format,
    layout: Layout,
    own: Mapping[str, torch.Tensor],
) -> int:
    """How many of the architecture's tensors the layout finds (by name)."""
    ns = layout.namespace
    return sum(1 for key in tensors if key.startswith(ns) and _renamed(fmt, key[len(ns) :]) in own)


def choose_layout(
    tensors: Mapping[str, torch.Tensor], fmt: Format, own: Mapping[str, torch.Tensor]
) -> Layout | None:
    return next((lay for lay in fmt.layouts if hits(tensors, fmt, lay, own)), None)


def _group(key: str, fmt: Format, namespace: str) -> str:
    """The label of a dropped tensor: its format's group, else its container's entry."""
    matches = [(len(prefix), label) for prefix, label in fmt.groups if key.startswith(prefix)]
    if matches:
        return max(matches)[1]
    parts = key.split(".")
    depth = 1
    if namespace and parts[0] == namespace.split(".")[0] and len(parts) > 2:
        depth = 3 if parts[1] == "module" else 2
    return ".".join(parts[:depth])


def extract(
    tensors: Mapping[str, torch.Tensor],
    fmt: Format,
    layout: Layout,
    model: nn.Module,
    arch: str,
    source: str,
) -> Extraction:
    """The architecture's state from the layout's namespace, strictly (module docstring)."""
    own = model.state_dict()
    ns, slot = layout.namespace, model.facts.structure.get("classifier", "")
    found: dict[str, tuple[str, torch.Tensor]] = {}  # architecture name -> (file key, tensor)
    leftovers, dropped = [], Counter()
    for key, value in tensors.items():
        if not key.startswith(ns):
            dropped[_group(key, fmt, ns)] += 1
            continue
        name = _renamed(fmt, key[len(ns) :])
        if name in own:
            if name in found:
                raise CheckpointImportError(
                    f"{source}: {found[name][0]} and {key} both name {name}"
                )
            found[name] = (key, value)
        elif name is not None and slot and (name == slot or name.startswith(slot + ".")):
            dropped[f"{fmt.slot} ({ns}{slot})"] += 1
        else:
            leftovers.append(key)
    for name, expected in own.items():
        if name in found and found[name][1].shape != expected.shape:
            key, value = found[name]
            raise CheckpointImportError(
                f"{source}: {key} has shape {tuple(value.shape)}, but {arch} expects "
                f"{tuple(expected.shape)} for {name}: the checkpoint is not a {arch} with "
                "these arguments (check --arch and --arch-arg)"
            )
    missing = [n for n in own if n not in found and not n.endswith(COUNTER)]
    if missing:
        raise CheckpointImportError(
            f"{source}: {len(missing)} of {arch}'s tensors are not under {ns or 'the top level'!r}"
            f", e.g. {', '.join(ns + n for n in missing[:3])}"
        )
    if leftovers:
        shown = ", ".join(leftovers[:5]) + (
            f", … ({len(leftovers)} in all)" if len(leftovers) > 5 else ""
        )
        raise CheckpointImportError(
            f"{source}: keys under the backbone's namespace {ns!r} that {arch} does not have: "
            f"{shown}"
        )
    state, filled = {}, []
    for name, expected in own.items():
        if name in found:
            state[name] = found[name][1].to(expected.dtype)
        else:
            state[name] = torch.zeros_like(expected)
            filled.append(name)
    return Extraction(state, dict(dropped), filled)


def detect(
    tensors: Mapping[str, torch.Tensor], paths: set[str], model: nn.Module, source: str
) -> tuple[Format, Layout, str]:
    """The format whose layout (and signature) the file matches, and a note saying how.

    Formats that read the same tensors under the same names count as one (a bare ResNet state
    dict is torchvision's, timm's and DINO's released layout alike); the first is chosen, and
    if they imply different methods, none is inferred.
    """
    own = model.state_dict()
    candidates = []
    for fmt in FORMATS.values():
        if fmt.signatures and not any(
            all(any(p.startswith(part) for p in paths) for part in sig) for sig in fmt.signatures
        ):
            continue
        layout = choose_layout(tensors, fmt, own)
        if layout is not None:
            reading = frozenset(
                (key, _renamed(fmt, key[len(layout.namespace) :]))
                for key in tensors
                if key.startswith(layout.namespace)
            )
            candidates.append((fmt, layout, reading))
    if not candidates:
        raise CheckpointImportError(
            f"{source}: no known format holds the architecture's "
            "tensors; name the format, or give --prefix"
        )
    listed = ", ".join(f"{f.name} ({lay.namespace or 'top level'})" for f, lay, _ in candidates)
    if len({reading for _, _, reading in candidates}) > 1:
        raise CheckpointImportError(f"{source}: ambiguous, it reads as {listed}; name the format")
    fmt, layout, _ = candidates[0]
    if len(candidates) == 1:
        return fmt, layout, f"detected {fmt.name}"
    methods = {_method(lay, _inner(tensors, lay)) for _, lay, _ in candidates}
    if len(methods) > 1:
        layout = Layout(layout.namespace, layout.variant)
    return fmt, layout, f"chose {fmt.name}; {listed} read the same tensors"


def _inner(tensors: Mapping[str, torch.Tensor], layout: Layout) -> set[str]:
    return {k[len(layout.namespace) :] for k in tensors if k.startswith(layout.namespace)}


def _method(layout: Layout, keys: set[str]) -> str | None:
    return layout.method(keys) if callable(layout.method) else layout.method


def import_checkpoint(
    fmt_name: str,
    checkpoint: str | Path,
    *,
    arch: str,
    out: str | Path,
    arch_kwargs: dict[str, Any] | None = None,
    method: str | None = None,
    prefix: str | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> ImportReport:
    """Read `checkpoint` as `fmt_name` (or detect it: "auto"), take the backbone `arch` out of it,
    and write it as a backbone artifact into `out`."""
    checkpoint, out = Path(checkpoint), Path(out)
    if (out / MANIFEST_FILE).exists():
        raise CheckpointImportError(
            f"{out} already holds a backbone ({MANIFEST_FILE}); choose another --out"
        )
    fmt = None if fmt_name == AUTO else get_format(fmt_name)
    for name, size in (("mean", len(mean)), ("std", len(std))):
        if size != 3:
            raise CheckpointImportError(f"--{name} takes 3 values (R G B), got {size}")
    obj = read_checkpoint(checkpoint)
    tensors = flatten(obj)
    source = str(checkpoint)
    given_kwargs = dict(arch_kwargs or {})
    model = build_backbone(arch, **given_kwargs)
    note = ""
    if prefix is not None:
        fmt = fmt or Format("prefix", ())
        layout = Layout(prefix, "--prefix")
    elif fmt is None:
        fmt, layout, note = detect(tensors, present_paths(obj), model, source)
    else:
        layout = choose_layout(tensors, fmt, model.state_dict())
        if layout is None:
            tried = ", ".join(repr(lay.namespace or "top level") for lay in fmt.layouts)
            raise CheckpointImportError(
                f"{source}: none of {arch}'s tensors is where {fmt.name} "
                f"keeps a backbone ({tried}); wrong format or --arch?"
            )
    if fmt.families and model.facts.family not in fmt.families:
        raise CheckpointImportError(
            f"the {fmt.name} format holds {' or '.join(fmt.families)} "
            f"backbones here; {arch} is a {model.facts.family}"
        )
    defaults = {
        k: v for k, v in layout.arch_defaults.get(arch, {}).items() if k not in given_kwargs
    }
    if defaults:  # the source's own variant of the architecture (MoCo v3's 12-head ViT-S)
        given_kwargs.update(defaults)
        model = build_backbone(arch, **given_kwargs)
    found = extract(tensors, fmt, layout, model, arch, source)
    inferred = _method(layout, _inner(tensors, layout))
    if method is None and inferred is None:
        raise CheckpointImportError(
            f"{source}: a {fmt.name} checkpoint does not say which method "
            "trained it; give --method NAME"
        )
    model.load_state_dict(found.state, strict=True)
    provenance = {
        "format": fmt.name,
        "file": checkpoint.name,
        "sha256": sha256_file(checkpoint),
        "namespace": layout.namespace,
        "variant": layout.variant,
        "dropped": found.dropped,
        "counters_set_to_zero": len(found.filled),
        "method": "given" if method else "inferred",
    }
    save_backbone(
        out,
        model,
        arch=arch,
        arch_kwargs=given_kwargs,
        method=method or inferred,
        mean=mean,
        std=std,
        imported=True,
        source=provenance,
        run_name=out.name,
    )  # as a pretraining run's: its directory names the row
    return ImportReport(
        out,
        fmt.name,
        layout.namespace,
        layout.variant,
        arch,
        given_kwargs,
        method or inferred,
        method is None,
        len(found.state),
        sum(p.numel() for p in model.parameters()),
        found.dropped,
        len(found.filled),
        note,
    )
