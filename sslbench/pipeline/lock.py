"""One `sslbench run` at a time per output directory: a pid file under an fcntl lock.

Two pipelines writing the same job directories would remove and resume each other's runs. The
lock is `flock` on OUTPUT_DIR/.sslbench-run.lock, which holds its owner's pid. The kernel drops
a flock when its process ends, however it ends, so a lock file left by a killed run is stale by
construction: the next run takes the lock and writes its own pid. The file is removed on a normal
exit; a process that locked a file another one removed meanwhile notices (the path no longer
names the file it locked) and tries again.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".sslbench-run.lock"


class PipelineLockedError(RuntimeError):
    """Another live `sslbench run` holds the output directory."""


def _owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return text or "unknown (it has not written it yet)"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def output_dir_lock(out: Path) -> Iterator[Path]:
    """Hold `out`'s lock for the duration, or raise PipelineLockedError naming the lock file and
    the pid of the process that holds it."""
    path = Path(out) / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise PipelineLockedError(
                f"{out} is in use by another `sslbench run` (pid {owner}, lock {path}); wait for "
                "it to finish or choose another output_dir"
            ) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file its owner removed on exit: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        # Removed while still locked: whoever opened it meanwhile gets the lock only on a file
        # that is gone, and tries again.
        path.unlink(missing_ok=True)
        os.close(fd)
