"""Import checkpoints of other codebases as backbone artifacts (`sslbench import`).

reading.py reads a file without running code from it, formats.py says where each source keeps
its backbone, importing.py takes the backbone out strictly and writes the artifact.
"""

from .formats import ALIASES, FORMATS, Format, Layout
from .importing import AUTO, CheckpointImportError, ImportReport, import_checkpoint
from .reading import CheckpointReadError, read_checkpoint

__all__ = [
    "ALIASES",
    "AUTO",
    "FORMATS",
    "CheckpointImportError",
    "CheckpointReadError",
    "Format",
    "ImportReport",
    "Layout",
    "import_checkpoint",
    "read_checkpoint",
]
