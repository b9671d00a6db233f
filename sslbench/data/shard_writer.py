"""Write an ImageFolder's splits as WebDataset shards (the layout in sslbench/data/shards.py).

Each shard is written to a temporary file and renamed into place once complete, so a shard under
its own name is always whole. The plan (source, split, shard size, the source's file list) is
written before the first shard; a run that finds the same plan keeps the shards already there
and writes the others, and one that finds another plan refuses rather than mix the two. The
index is written last: a split without one is unfinished, and running the command again
finishes it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ..io import atomic_path, sha256_file, write_json_atomic
from .base import SPLITS, DatasetError
from .imagefolder import ImageFolder
from .shards import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    LABEL_MEMBER,
    PATH_MEMBER,
    read_index,
    sample_key,
    shard_name,
)

PLAN_FILE = ".plan.json"
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def write_shards(
    folder: str | Path,
    out: str | Path,
    shard_size: int,
    splits: list[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Shard `splits` of the ImageFolder at `folder` (default: every split it has) into
    out/<split>/; the index files written (or found complete)."""
    folder, out = Path(folder), Path(out)
    if type(shard_size) is not int or shard_size < 1:
        raise DatasetError(f"shard size must be a positive number of samples, got {shard_size!r}")
    if splits is None:
        splits = [s for s in SPLITS if (folder / s).is_dir()]
        if not splits:
            raise DatasetError(f"{folder} has none of the split directories {', '.join(SPLITS)}")
    return [
        write_split(ImageFolder(folder, split), out / split, shard_size, progress)
        for split in splits
    ]


def write_split(source: ImageFolder, out: Path, shard_size: int, progress: bool = True) -> Path:
    """Shard one split into `out`; the index's path."""
    plan = _plan(source, shard_size)
    index_path = out / INDEX_FILE
    if index_path.exists():
        _same_plan(read_index(index_path), plan, index_path)
        return index_path
    _claim(out, plan)
    shards = []
    ranges = [(lo, min(lo + shard_size, len(source))) for lo in range(0, len(source), shard_size)]
    with tqdm(
        total=len(source),
        desc=f"shard {source.split_dir} -> {out}",
        unit="img",
        disable=not progress,
    ) as bar:
        for number, (lo, hi) in enumerate(ranges):
            path = out / shard_name(source.split, number)
            digest = sha256_file(path) if path.exists() else _write_shard(path, source, lo, hi)
            shards.append(
                {
                    "file": path.name,
                    "samples": hi - lo,
                    "bytes": path.stat().st_size,
                    "sha256": digest,
                }
            )
            bar.update(hi - lo)
    write_json_atomic(index_path, {**plan, "shards": shards})
    (out / PLAN_FILE).unlink()
    return index_path


def _plan(source: ImageFolder, shard_size: int) -> dict[str, Any]:
    """What the shards are made from and how; a rerun must find exactly this."""
    listing = hashlib.sha256()
    for file in source.files:
        path = source.split_dir / file
        try:
            listing.update(f"{file}\t{path.stat().st_size}\n".encode())
        except OSError as err:
            raise DatasetError(f"cannot read image {path}: {err}") from None
    per_class = Counter(source.targets)
    counts = [per_class[label] for label in range(source.num_classes)]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "split": source.split,
        "shard_size": shard_size,
        "samples": len(source),
        "classes": source.classes,
        "class_counts": counts,
        "source": {"root": str(source.root.resolve()), "files_sha256": listing.hexdigest()},
    }


def _same_plan(found: dict[str, Any], plan: dict[str, Any], where: Path) -> None:
    differ = [
        f"{k}: {found.get(k)!r} there, {v!r} now" for k, v in plan.items() if found.get(k) != v
    ]
    if differ:
        raise DatasetError(
            f"{where} is for other shards ({'; '.join(differ)}); write to "
            f"another directory, or delete {where.parent} to write it again"
        )


def _claim(out: Path, plan: dict[str, Any]) -> None:
    """Record the plan before the first shard, or check the one an interrupted run recorded;
    delete the temporary files such a run left behind."""
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        _same_plan(_read_json(plan_path), plan, plan_path)
    elif out.exists() and any(out.iterdir()):
        raise DatasetError(
            f"{out} is not empty and holds no shards of an unfinished run "
            f"({PLAN_FILE} is missing); write to another directory"
        )
    else:
        write_json_atomic(plan_path, plan)
    for stale in out.glob(f".{plan['split']}-*.tar.*.tmp"):
        stale.unlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(
            f"{path} is unreadable ({err}); delete {path.parent} to write the shards again"
        ) from None


class _Hashing:
    """A write-only file that hashes what passes through it (tar writes it as one stream)."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        return self.file.write(data)


def _write_shard(path: Path, source: ImageFolder, lo: int, hi: int) -> str:
    """Samples [lo, hi) of `source` as one tar file at `path`; its sha256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        sink = _Hashing(file)
        # mtime fixed: the same images give the same bytes, so a rewritten shard keeps its sha256
        with wds.TarWriter(sink, encoder=False, mtime=0) as tar:
            for i in range(lo, hi):
                relative = source.files[i]
                data = _read_image(source.split_dir / relative)
                tar.write(
                    {
                        "__key__": sample_key(i),
                        Path(relative).suffix[1:].lower(): data,
                        LABEL_MEMBER: str(source.targets[i]).encode(),
                        PATH_MEMBER: relative.encode(),
                    }
                )
    return sink.sha256.hexdigest()


def _read_image(path: Path) -> bytes:
    """The file's bytes, after PIL has parsed its header (a file that is not an image fails
    here, naming it, not in a training run)."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except _READ_ERRORS as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err
    return data
