"""Shards: an ImageFolder split as WebDataset tar files, read without listing millions of files.

    root/{split}/index.json              classes, counts per class, every shard's count and sha256
    root/{split}/{split}-NNNNNN.tar      samples in the folder's sorted order, shard after shard

`sslbench data shard` writes them (sslbench/data/shard_writer.py). Sample i of the split has the
key `sample_key(i)` (its index, zero-padded, so keys sort in the folder's order) and three
members: `<key>.<ext>` (the image file's bytes as they were, never re-encoded), `<key>.cls`
(its label) and `<key>.path.txt` (its path in the folder). The folder order is class-major, so
every label follows from the index's counts per class and no shard is read to know one.

`ShardDataset` is a map-style `LabeledDataset` whose reads walk a shard forward: reading in
index order (feature extraction: each process and worker takes a contiguous range) opens each
shard once and skips what it does not need without reading it. Pretraining streams the shards in
a seeded order instead (pretrain/shard_loader.py), through `read()`.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image
from tqdm import tqdm

from ..io import sha256_file
from .base import DatasetError, LabeledDataset
from .imagefolder import FULL_DECODE_LIMIT, IMAGE_EXTENSIONS
from .registry import DATASETS

FORMAT = "sslbench-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
KEY_DIGITS = 10
LABEL_MEMBER = "cls"
PATH_MEMBER = "path.txt"
IMAGE_MEMBERS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# How pretraining reads the shards (pretrain/shard_loader.py): the number of streams a global
# batch is drawn from, and the samples each stream shuffles at a time (it holds whole shards, so
# at least one shard). Dataset options, so a recipe sets them as data.options.
DEFAULT_STREAMS = 64
DEFAULT_SHUFFLE_BUFFER = 256
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


@dataclass(frozen=True)
class Shard:
    path: Path
    first: int  # index of its first sample in the split
    samples: int
    size: int  # bytes
    sha256: str


def read_index(path: Path) -> dict[str, Any]:
    """The index at `path`, checked for what readers rely on; DatasetError naming what is wrong."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(
            f"shard index {path} does not exist (write shards with `sslbench "
            f"data shard IMAGEFOLDER {path.parent.parent}`)"
        ) from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"shard index {path} is unreadable: {err}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DatasetError(f'{path} is not a shard index (no "format": "{FORMAT}")')
    if index.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: shard format version {index.get('version')!r}; this "
            f"sslbench reads version {FORMAT_VERSION}"
        )
    try:
        classes, counts, shards = index["classes"], index["class_counts"], index["shards"]
        total = sum(s["samples"] for s in shards)
        ok = (
            len(classes) == len(counts)
            and len(set(classes)) == len(classes)
            and classes
            and all(type(c) is int and c > 0 for c in counts)
            and all(type(s["samples"]) is int and s["samples"] > 0 for s in shards)
            and all(isinstance(s[k], str) for s in shards for k in ("file", "sha256"))
            and all(type(s["bytes"]) is int for s in shards)
        )
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path}: malformed shard index ({err!r})") from None
    if not ok:
        raise DatasetError(
            f"{path}: malformed shard index: expected distinct classes with a "
            "positive count each and shards with a positive sample count"
        )
    if not sum(counts) == total == index.get("samples"):
        raise DatasetError(
            f"{path}: the counts disagree: {sum(counts)} per class, {total} in "
            f"shards, {index.get('samples')!r} in all"
        )
    return index


class ShardDataset(LabeledDataset):
    """One split of a shard directory (see the module docstring)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Callable | None = None,
        streams: int = DEFAULT_STREAMS,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    ):
        root = Path(root)
        index_path = root / split / INDEX_FILE
        index = read_index(index_path)
        for key, value in (("streams", streams), ("shuffle_buffer", shuffle_buffer)):
            if type(value) is not int or value < 1:
                raise DatasetError(
                    f"dataset 'shards': option {key} must be a positive integer, got {value!r}"
                )
        self.streams, self.shuffle_buffer = streams, shuffle_buffer
        self.shards: list[Shard] = []
        first = 0
        for entry in index["shards"]:
            path = index_path.parent / entry["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != entry["bytes"]:
                found = "missing" if size is None else f"{size} bytes"
                raise DatasetError(
                    f"shard {path} is {found}; {index_path} lists it with "
                    f"{entry.get('bytes')} bytes: write the shards again"
                )
            self.shards.append(Shard(path, first, entry["samples"], size, entry["sha256"]))
            first += entry["samples"]
        self._firsts = [s.first for s in self.shards]
        targets = [label for label, n in enumerate(index["class_counts"]) for _ in range(n)]
        digest = hashlib.sha256(
            json.dumps([index["classes"], [s.sha256 for s in self.shards]]).encode()
        ).hexdigest()
        super().__init__(
            "shards",
            root,
            split,
            index["classes"],
            targets,
            transform,
            params={"shards_sha256": digest},
        )
        self._cursor: _Cursor | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cursor": None}  # an open shard stays with its process

    def shard_of(self, index: int) -> int:
        return bisect.bisect_right(self._firsts, index) - 1

    def read(
        self, shard: int, lo: int = 0, hi: int | None = None, wanted: set[int] | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """(index, encoded image) of samples [lo, hi) of shard number `shard` (positions within
        it), those in `wanted` only if given, in order. Others are skipped without reading."""
        s = self.shards[shard]
        lo, hi = s.first + lo, s.first + (s.samples if hi is None else hi)
        with _ShardReader(s) as reader:
            for index, member in reader.members():
                if index >= hi:
                    return
                if index >= lo and (wanted is None or index in wanted):
                    yield index, reader.data(member)

    def decode(self, index: int, data: bytes) -> Image.Image:
        """The RGB image of sample `index` from its bytes; errors name the shard and the key."""
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except _READ_ERRORS as err:
            raise DatasetError(
                f"cannot read image {sample_key(index)} in shard "
                f"{self.shards[self.shard_of(index)].path}: {err}"
            ) from err

    def load_image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a split of {len(self)}")
        shard = self.shard_of(index)
        cursor = self._cursor
        if cursor is None or not cursor.can_reach(shard, index):
            if cursor is not None:
                cursor.close()
            cursor = self._cursor = _Cursor(self.shards[shard], shard)
        return self.decode(index, cursor.get(index))

    def verify(self, progress: bool = True) -> None:
        """Walk every shard's members (each sample's image there, keys in order). Up to
        FULL_DECODE_LIMIT samples, as ImageFolder decodes that many, also check each shard's
        sha256 against the index and each label against the counts, and decode every image."""
        full = len(self) <= FULL_DECODE_LIMIT
        for s in tqdm(
            self.shards, desc=f"verify shards/{self.split}", unit="shard", disable=not progress
        ):
            if full and sha256_file(s.path) != s.sha256:
                raise DatasetError(
                    f"shard {s.path} does not have the sha256 its index lists: "
                    "it changed or is damaged; write the shards again"
                )
            with _ShardReader(s) as reader:
                for index, member in reader.members(LABEL_MEMBER if full else None):
                    if full and int(reader.data(member)) != self.targets[index]:
                        raise DatasetError(
                            f"shard {s.path}: sample {sample_key(index)} has "
                            f"label {int(reader.data(member))}, the index "
                            f"{self.targets[index]}"
                        )
        if full:
            for i in range(len(self)):
                self.load_image(i)


class _ShardReader:
    """A shard's members in file order; a member's data is read only when asked for."""

    def __init__(self, shard: Shard):
        self.shard = shard
        try:
            self.tar = tarfile.open(shard.path, "r:")  # seekable: members are skipped, not read
        except (OSError, tarfile.TarError) as err:
            raise DatasetError(f"cannot open shard {shard.path}: {err}") from None

    def __enter__(self) -> _ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.tar.close()

    def members(self, kind: str | None = None) -> Iterator[tuple[int, tarfile.TarInfo]]:
        """(sample index, member) of each sample's member with extension `kind` (None: its
        image), in order; a sample without one is an error naming the shard and the key."""
        expected, last = self.shard.first, self.shard.first + self.shard.samples
        while expected < last:
            try:
                member = self.tar.next()
            except (OSError, tarfile.TarError) as err:
                raise DatasetError(f"shard {self.shard.path} is damaged: {err}") from None
            if member is None:
                raise DatasetError(
                    f"shard {self.shard.path} ends before sample "
                    f"{sample_key(expected)}: it is not the file its index "
                    "describes; write the shards again"
                )
            key, _, ext = member.name.partition(".")
            if ext == kind or (kind is None and ext in IMAGE_MEMBERS):
                if key != sample_key(expected):
                    raise DatasetError(
                        f"shard {self.shard.path}: member {member.name!r} where "
                        f"sample {sample_key(expected)}'s was expected: it is "
                        "not the file its index describes"
                    )
                yield expected, member
                expected += 1

    def data(self, member: tarfile.TarInfo) -> bytes:
        try:
            return self.tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as err:
            raise DatasetError(
                f"shard {self.shard.path}: cannot read {member.name}: {err}"
            ) from None


class _Cursor:
    """The shard this process reads, positioned after the last sample it returned."""

    def __init__(self, shard: Shard, number: int):
        self.pid, self.number, self.next = os.getpid(), number, shard.first
        self.reader = _ShardReader(shard)
        self.images = self.reader.members()

    def can_reach(self, number: int, index: int) -> bool:
        return self.pid == os.getpid() and number == self.number and index >= self.next

    def get(self, index: int) -> bytes:
        found, member = next(self.images)  # members() raises if the shard ends early
        while found < index:
            found, member = next(self.images)
        self.next = index + 1
        return self.reader.data(member)

    def close(self) -> None:
        if self.pid == os.getpid():
            self.reader.close()


@DATASETS.register("shards")
def shards(
    root: Path,
    split: str,
    transform: Callable | None = None,
    streams: int = DEFAULT_STREAMS,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> ShardDataset:
    return ShardDataset(root, split, transform, streams, shuffle_buffer)
