"""Load pickles that may only rebuild numpy arrays.

CIFAR ships as pickles, and `pickle.load` calls whatever callable the file names (os.system
included), so a dataset file from the internet could run code. This unpickler resolves only the
globals an ndarray-bearing pickle needs, whichever Python or numpy wrote it.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .base import DatasetError

try:
    from numpy._core import multiarray, numeric
except ImportError:  # numpy < 1.26 has no numpy._core
    from numpy.core import multiarray, numeric

ALLOWED_GLOBALS = {
    # protocols 0-4: ndarray.__reduce__ (module renamed numpy.core -> numpy._core in numpy 2)
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    # protocol 5: ndarray.__reduce_ex__ with a pickle buffer
    ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # protocols 0-2 written by Python 3 store bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class refuses every global outside ALLOWED_GLOBALS."""

    def __init__(self, file, path: Path):
        # latin1 maps Python 2 str (CIFAR's keys and raw array bytes) to str byte-for-byte, which
        # is what numpy expects when it rebuilds an array pickled by Python 2.
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.path}: refusing to load global {module}.{name}; only "
                f"numpy arrays are allowed (the file may be malicious)"
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Unpickle `path` through RestrictedUnpickler; any failure is a DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, path).load()
    except DatasetError:
        raise
    except Exception as err:  # a corrupt pickle can fail in any of a dozen exception types
        raise DatasetError(f"{path} is not a readable pickle: {type(err).__name__}: {err}") from err
