"""The result record (docs/design.md, contract 2): what every task writes and the leaderboard reads.

One JSON file per (backbone, task, protocol, seed). `protocol` holds every hyper-parameter that
changes the number and `protocol_id` is a short hash of it, so two records are comparable exactly
when their task and protocol_id agree: a different protocol is a different column, never averaged
in. Records are validated when written and when read; a malformed one raises `RecordError` naming
the file and the field. Files are written atomically under a name unique per (weights, task,
protocol, seed), so evaluators writing into one directory at the same time lose nothing.

Every task's output becomes a record through `build_record`, which fills in what no task should
compute for itself: the backbone's identity, wall time, peak memory, device, library versions and
the process count.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import recipe_hash
from .io import write_json_atomic
from .tasks import tasks

# 2: the backbone's identity carries its pretraining config (hash and values) and, for an
# imported checkpoint, where it came from (format, file, sha256); version-1 records read with
# those unknown.
SCHEMA_VERSION = 2
# details[HITS_KEY]: the test split's per-image top-1 hits (pack_hits), in the split's order, so
# the leaderboard can bootstrap a single run's interval and pair two rows on the same images.
HITS_KEY = "test_top1_hits"
VERSION_KEYS = ("python", "torch", "torchvision", "faiss", "sslbench")
# pip distribution names faiss ships under; the first installed one is recorded.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class RecordError(ValueError):
    """A result record that does not follow the schema; the message names the file and field."""


def protocol_id(protocol: dict) -> str:
    """12 hex digits of the sha256 of the canonical JSON of `protocol`."""
    blob = json.dumps(protocol, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_stem(task: str, weights_sha256: str, protocol_id: str, seed: int) -> str:
    """A record's file name without its suffix; a task's work directory is named alike."""
    return f"{task}-{weights_sha256[:12]}-{protocol_id}-seed{seed}"


SOURCE_KEYS = ("format", "file", "sha256")  # what the board shows of an imported backbone


def _imported_source(manifest: dict) -> dict[str, str] | None:
    source = manifest.get("source") if manifest.get("imported") else None
    return None if source is None else {k: str(source[k]) for k in SOURCE_KEYS}


@dataclass(frozen=True)
class BackboneIdentity:
    """Which backbone: its weights, and what made them. Seeds of one pretraining config share
    `config_hash` (one leaderboard row); configs that differ never do."""

    weights_sha256: str
    method: str
    run_name: str | None
    arch: str
    config_hash: str | None = None  # the pretraining recipe's (config.recipe_hash: no seed)
    config: dict[str, Any] = field(default_factory=dict)  # that config, to label rows apart
    source: dict[str, str] | None = None  # an imported checkpoint's: format, file, sha256

    @classmethod
    def from_manifest(cls, manifest: dict) -> BackboneIdentity:
        config = manifest.get("config") or {}
        return cls(
            manifest["weights_sha256"],
            manifest["method"],
            manifest.get("run_name"),
            manifest["arch"],
            recipe_hash(config) if config else None,
            config,
            _imported_source(manifest),
        )


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    splits: dict[str, int]  # split name -> number of samples used
    description: dict[str, Any]  # the training split's describe(): root, generator params, ...


@dataclass(frozen=True)
class ResultRecord:
    task: str
    metrics: dict[str, float]
    backbone: BackboneIdentity
    protocol: dict[str, Any]
    dataset: DatasetInfo
    seed: int
    wall_time_s: float
    peak_memory_mb: dict[str, float | None]  # cpu_rss, cuda_max_allocated (None off GPU)
    device: str
    versions: dict[str, str | None]
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the selection grid, notes
    created: str = ""  # filled with the current UTC time when empty
    schema_version: int = SCHEMA_VERSION
    protocol_id: str = field(init=False)  # always protocol_id(protocol)

    def __post_init__(self):
        if not self.created:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            object.__setattr__(self, "created", now)
        object.__setattr__(self, "protocol_id", protocol_id(self.protocol))

    @property
    def file_name(self) -> str:
        """Unique per (weights, task, protocol, seed): one file per comparable number."""
        return (
            record_stem(self.task, self.backbone.weights_sha256, self.protocol_id, self.seed)
            + ".json"
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, source: str = "record") -> ResultRecord:
        """Build and validate a record from parsed JSON; errors name `source` and the field."""
        _check(isinstance(obj, dict), source, "<top level>", "expected a JSON object", obj)
        version = obj.get("schema_version")
        _check(
            isinstance(version, int) and not isinstance(version, bool),
            source,
            "schema_version",
            "expected an integer",
            version,
        )
        _check(
            version <= SCHEMA_VERSION,
            source,
            "schema_version",
            f"newer than this sslbench reads ({SCHEMA_VERSION}); upgrade sslbench",
            version,
        )
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(obj))
        _check(not missing, source, ", ".join(missing), "missing", None)
        unknown = sorted(set(obj) - names)
        _check(not unknown, source, ", ".join(unknown), "unknown field", None)
        _check(
            isinstance(obj["created"], str) and bool(obj["created"]),
            source,
            "created",
            "expected an ISO timestamp",
            obj["created"],
        )  # empty would be filled in
        data = dict(obj)
        stored_id = data.pop("protocol_id")
        data["backbone"] = _sub(BackboneIdentity, obj["backbone"], source, "backbone")
        data["dataset"] = _sub(DatasetInfo, obj["dataset"], source, "dataset")
        _check(
            _json_object(data["protocol"]) and bool(data["protocol"]),
            source,
            "protocol",
            "expected a non-empty JSON object",
            None,
        )
        record = cls(**data)
        _check(
            stored_id == record.protocol_id,
            source,
            "protocol_id",
            f"does not match the protocol (whose id is {record.protocol_id}); the protocol "
            "was edited after the record was written",
            stored_id,
        )
        validate(record, source)
        return record


def _check(ok: bool, source: str, where: str, problem: str, value: Any) -> None:
    if not ok:
        shown = "" if value is None else f" (got {json.dumps(value, default=repr)[:80]})"
        raise RecordError(f"{source}: field {where!r}: {problem}{shown}")


def _sub(cls: type, obj: Any, source: str, where: str):
    """A nested dataclass from JSON: every field without a default must be there (those with
    one were added by a later schema version), and no unknown field."""
    _check(isinstance(obj, dict), source, where, "expected a JSON object", obj)
    names = [f.name for f in fields(cls)]
    required = [
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in obj]
    _check(not missing, source, ", ".join(f"{where}.{n}" for n in missing), "missing", None)
    unknown = sorted(set(obj) - set(names))
    _check(not unknown, source, ", ".join(f"{where}.{n}" for n in unknown), "unknown field", None)
    return cls(**obj)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_object(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict)


def validate(record: ResultRecord, source: str = "record") -> None:
    """Check every field's type and value; raise RecordError naming the first bad one."""
    r, s = record, source
    _check(
        _is_int(r.schema_version) and 1 <= r.schema_version <= SCHEMA_VERSION,
        s,
        "schema_version",
        f"expected an integer in 1..{SCHEMA_VERSION}",
        r.schema_version,
    )
    known = tasks().names()
    _check(
        r.task in known,
        s,
        "task",
        f"expected a registered task ({', '.join(known)}; more "
        "register through $SSLBENCH_TASK_MODULES)",
        r.task,
    )
    _check(
        isinstance(r.metrics, dict) and bool(r.metrics),
        s,
        "metrics",
        "expected a non-empty object of numbers",
        r.metrics,
    )
    for name, value in r.metrics.items():
        _check(_is_number(value), s, f"metrics.{name}", "expected a finite number", value)
    b = r.backbone
    _check(
        isinstance(b.weights_sha256, str) and bool(_SHA256.fullmatch(b.weights_sha256)),
        s,
        "backbone.weights_sha256",
        "expected 64 lowercase hex digits",
        b.weights_sha256,
    )
    for key in ("method", "arch"):
        value = getattr(b, key)
        _check(
            isinstance(value, str) and bool(value),
            s,
            f"backbone.{key}",
            "expected a non-empty string",
            value,
        )
    _check(
        b.run_name is None or isinstance(b.run_name, str),
        s,
        "backbone.run_name",
        "expected a string or null",
        b.run_name,
    )
    _check(
        b.config_hash is None or (isinstance(b.config_hash, str) and bool(b.config_hash)),
        s,
        "backbone.config_hash",
        "expected a non-empty string or null",
        b.config_hash,
    )
    _check(
        b.source is None
        or (
            isinstance(b.source, dict)
            and set(b.source) == set(SOURCE_KEYS)
            and all(isinstance(v, str) for v in b.source.values())
        ),
        s,
        "backbone.source",
        f"expected null or an object of strings {SOURCE_KEYS}",
        b.source,
    )
    _check(_json_object(b.config), s, "backbone.config", "expected a JSON object", None)
    _check(
        _json_object(r.protocol) and bool(r.protocol),
        s,
        "protocol",
        "expected a non-empty JSON object",
        None,
    )
    d = r.dataset
    _check(
        isinstance(d.name, str) and bool(d.name),
        s,
        "dataset.name",
        "expected a non-empty string",
        d.name,
    )
    _check(
        _is_int(d.num_classes) and d.num_classes > 0,
        s,
        "dataset.num_classes",
        "expected a positive integer",
        d.num_classes,
    )
    _check(
        isinstance(d.splits, dict) and bool(d.splits),
        s,
        "dataset.splits",
        "expected a non-empty object",
        d.splits,
    )
    for split, size in d.splits.items():
        _check(
            _is_int(size) and size >= 0,
            s,
            f"dataset.splits.{split}",
            "expected a non-negative integer",
            size,
        )
    _check(_json_object(d.description), s, "dataset.description", "expected a JSON object", None)
    _check(_is_int(r.seed), s, "seed", "expected an integer", r.seed)
    _check(
        _is_number(r.wall_time_s) and r.wall_time_s >= 0,
        s,
        "wall_time_s",
        "expected a non-negative number",
        r.wall_time_s,
    )
    _check(
        isinstance(r.peak_memory_mb, dict) and "cpu_rss" in r.peak_memory_mb,
        s,
        "peak_memory_mb",
        "expected an object with cpu_rss",
        r.peak_memory_mb,
    )
    for key, value in r.peak_memory_mb.items():
        _check(
            value is None or (_is_number(value) and value >= 0),
            s,
            f"peak_memory_mb.{key}",
            "expected a non-negative number or null",
            value,
        )
    _check(
        isinstance(r.device, str) and bool(r.device),
        s,
        "device",
        "expected a non-empty string",
        r.device,
    )
    _check(isinstance(r.versions, dict), s, "versions", "expected an object", r.versions)
    for key in VERSION_KEYS:
        _check(key in r.versions, s, f"versions.{key}", "missing", None)
    for key, value in r.versions.items():
        _check(
            value is None or isinstance(value, str),
            s,
            f"versions.{key}",
            "expected a string or null",
            value,
        )
    _check(_json_object(r.details), s, "details", "expected a JSON object", None)
    if HITS_KEY in r.details:
        try:
            hits = unpack_hits(r.details[HITS_KEY])
        except ValueError as err:
            _check(False, s, f"details.{HITS_KEY}", str(err), None)
        _check(
            len(hits) == d.splits.get("test"),
            s,
            f"details.{HITS_KEY}",
            f"holds {len(hits)} images, the test split {d.splits.get('test')}",
            None,
        )
    _check(isinstance(r.created, str), s, "created", "expected an ISO timestamp", r.created)
    try:
        datetime.datetime.fromisoformat(r.created)
    except ValueError:
        _check(False, s, "created", "expected an ISO timestamp", r.created)


def pack_hits(hits: Any) -> dict[str, Any]:
    """Per-image 0/1 hits as {"n": N, "bits": base64 of the packed bits}: 1,600 images take 268
    characters, ImageNet's 50,000 about 8 kB."""
    bits = np.asarray(hits, dtype=bool).ravel()
    return {"n": int(bits.size), "bits": base64.b64encode(np.packbits(bits)).decode("ascii")}


def unpack_hits(packed: Any) -> np.ndarray:
    """The bool array `pack_hits` packed; ValueError when `packed` is not such an object."""
    if not (
        isinstance(packed, dict)
        and set(packed) == {"n", "bits"}
        and _is_int(packed["n"])
        and packed["n"] >= 0
        and isinstance(packed["bits"], str)
    ):
        raise ValueError('expected {"n": count, "bits": base64}')
    try:
        raw = base64.b64decode(packed["bits"], validate=True)
    except binascii.Error as err:
        raise ValueError(f"bits are not base64 ({err})") from None
    if len(raw) != (packed["n"] + 7) // 8:
        raise ValueError(f"{len(raw)} bytes cannot hold exactly {packed['n']} bits")
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=packed["n"]).astype(bool)


@dataclass(frozen=True)
class TaskOutput:
    """What a task hands to `build_record`: its numbers and what produced them."""

    metrics: dict[str, float]
    protocol: dict[str, Any]  # every hyper-parameter that changes the number
    details: dict[str, Any] = field(default_factory=dict)
    dataset: DatasetInfo | None = None  # None: the stage's frame fills it in (evaluators do)
    splits: dict[str, int] = field(default_factory=dict)  # sizes beyond the dataset's splits
    versions: dict[str, str | None] = field(default_factory=dict)  # beyond library_versions()


def build_record(
    task: str,
    output: TaskOutput,
    manifest: dict,
    *,
    seed: int,
    started: float,
    device: str,
    world_size: int,
    cuda: bool,
) -> ResultRecord:
    """The record of `output`, measured since `started` (a time.perf_counter() value) on
    `device` (see distributed.device_name) by `world_size` processes."""
    if output.dataset is None:
        raise ValueError(f"task {task!r}: its output names no dataset")
    return ResultRecord(
        task=task,
        metrics=output.metrics,
        backbone=BackboneIdentity.from_manifest(manifest),
        protocol=output.protocol,
        dataset=output.dataset,
        seed=seed,
        wall_time_s=round(time.perf_counter() - started, 3),
        peak_memory_mb=peak_memory_mb(cuda),
        device=device,
        versions={**library_versions(), **output.versions},
        details={**output.details, "world_size": world_size},
    )


def write_record(directory: str | Path, record: ResultRecord) -> Path:
    """Validate, then write atomically as `directory/record.file_name`; returns the path.

    Re-running the same (backbone, task, protocol, seed) replaces its record.
    """
    path = Path(directory) / record.file_name
    validate(record, str(path))
    write_json_atomic(path, record.to_json())
    return path


def read_record(path: str | Path) -> ResultRecord:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{path}: cannot read ({err})") from None
    except json.JSONDecodeError as err:
        raise RecordError(f"{path}: not valid JSON ({err})") from None
    return ResultRecord.from_json(obj, str(path))


def load_records(
    directory: str | Path,
) -> tuple[list[ResultRecord], list[tuple[Path, RecordError]]]:
    """Every record under `directory` (recursively, skipping hidden entries such as caches and
    temporary files), plus (path, error) for each malformed one: one bad file never hides the rest.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"results directory {directory} does not exist")
    records, errors = [], []
    for path in sorted(directory.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        try:
            records.append(read_record(path))
        except RecordError as err:
            errors.append((path, err))
    return records, errors


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that can change a number (None: not installed)."""
    import torch
    import torchvision

    faiss = next(filter(None, map(distribution_version, FAISS_DISTRIBUTIONS)), None)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "faiss": faiss,
        "sslbench": __version__,
    }


def distribution_version(dist: str) -> str | None:
    """The installed version of pip distribution `dist`; None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def peak_memory_mb(cuda: bool) -> dict[str, float | None]:
    """This process's peak resident set size, and the CUDA allocator's peak when on a GPU."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB
    cuda_mb = None
    if cuda:
        import torch

        cuda_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"cpu_rss": round(rss_mb, 1), "cuda_max_allocated": cuda_mb}
