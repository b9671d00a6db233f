"""Read a checkpoint file of another codebase without running code from it.

The file's bytes decide how, not its name:
- safetensors: read as such (it holds tensors only);
- torch.save files (zip or the pre-1.6 legacy format): torch.load(weights_only=True), whose
  unpickler builds tensors and plain containers only. Training checkpoints also hold metadata
  objects (DINO's argparse Namespace, Lightning and mmengine state, numpy scalars); in a zip
  file, a class from one of METADATA_PACKAGES (or a BUILTIN_TYPE) is replaced by an inert
  `Placeholder` (its own code never runs; importing needs only the tensors), and any other
  global (os.system, builtins.exec, ...) refuses the file before anything is unpickled. The
  legacy format cannot be scanned first: torch refuses its non-tensor globals while loading.
- anything else is a plain pickle (detectron2's .pkl, numpy arrays in dicts): the restricted
  unpickler of sslbench.data.safe_pickle, which rebuilds numpy arrays and nothing else.
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..artifact import ArtifactError
from ..data import DatasetError
from ..data.safe_pickle import load_pickle

ZIP_MAGIC = b"PK\x03\x04"
# A legacy torch.save file starts with its magic number pickled (protocol 2, LONG1 of 10 bytes).
LEGACY_HEADER = b"\x80\x02\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
# Packages whose classes appear as metadata in the checkpoints of the supported sources.
METADATA_PACKAGES = frozenset(
    {
        "argparse",
        "collections",
        "datetime",
        "enum",
        "pathlib",
        "typing",  # standard library
        "numpy",
        "omegaconf",  # scalars and RNG states; Hydra / solo-learn configs
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",  # Lightning (solo-learn, lightly)
        "mmengine",
        "mmcv",
        "mmpretrain",
        "mmselfsup",
        "mmcls",  # OpenMMLab
        "classy_vision",
        "vissl",
        "fvcore",
        "iopath",
        "detectron2",
        "timm",
    }
)
# Builtin types a container can name (defaultdict(list), a set); never builtins' functions.
BUILTIN_TYPES = frozenset(
    f"builtins.{t}"
    for t in (
        "bool",
        "bytearray",
        "bytes",
        "complex",
        "dict",
        "float",
        "frozenset",
        "int",
        "list",
        "object",
        "set",
        "slice",
        "str",
        "tuple",
    )
)


class CheckpointReadError(ArtifactError):
    """A checkpoint file that cannot be read safely (or at all)."""


class Placeholder:
    """Stands in for a metadata class named in a checkpoint; keeps what the file handed it."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.qualname}>"


def placeholder(qualname: str) -> type:
    return type(qualname.rpartition(".")[2], (Placeholder,), {"qualname": qualname})


def read_checkpoint(path: str | Path) -> Any:
    """The object a checkpoint file holds, read safely (module docstring); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head):
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointReadError(f"{path}: not a readable safetensors file ({err})") from None
    if head.startswith(ZIP_MAGIC) or head.startswith(LEGACY_HEADER):
        return _torch_load(path, zipped=head.startswith(ZIP_MAGIC))
    try:
        return load_pickle(path)
    except DatasetError as err:
        raise CheckpointReadError(f"refusing to read {path} as a pickle: {err}") from None


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 0


def _torch_load(path: Path, zipped: bool) -> Any:
    stand_ins = []
    if zipped:  # the legacy format cannot be scanned; its unknown globals are refused below
        for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
            if name.partition(".")[0] not in METADATA_PACKAGES and name not in BUILTIN_TYPES:
                raise CheckpointReadError(
                    f"refusing to load {path}: it names {name}, which is neither a tensor, a "
                    "plain container nor a known training framework's metadata class (the file "
                    "may be malicious); nothing from it was run"
                )
            stand_ins.append((placeholder(name), name))
    try:
        with torch.serialization.safe_globals(stand_ins):
            # mmap: only the tensors that are read (the backbone's) come into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+)", str(err))
        detail = f"it names {named.group(1)}" if named else str(err).splitlines()[0]
        raise CheckpointReadError(
            f"refusing to load {path}: torch's weights-only unpickler "
            f"rejected it ({detail}); nothing from it was run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointReadError(f"{path}: not a readable torch checkpoint ({err})") from None
