"""Where a detectron2 run continues: its work directory's last checkpoint, if it was written
under the same recipe. A leaf module (no detectron2 import) shared by the backend, which asks
before launching, and the trainer, which checks again as it loads."""

from __future__ import annotations

from pathlib import Path

from sslbench.checkpoint import load_checkpoint, require_same_recipe

LAST_CHECKPOINT = "last_checkpoint"  # detectron2's name of the newest checkpoint, in OUTPUT_DIR
STATE_KEY = "sslbench"  # the trainer state's entry for the recipe key and the RNG states


def check_recipe(path: Path, found: str | None, key: str) -> None:
    """A CheckpointError when the checkpoint `path` was written under another recipe key."""
    require_same_recipe(path, found, key, f"delete {path.parent / LAST_CHECKPOINT}")


def resume_point(work_dir: Path, key: str) -> int | None:
    """The iteration a run continues at from the work directory's last detectron2 checkpoint;
    None when there is none, a CheckpointError when it is another recipe's."""
    pointer = work_dir / LAST_CHECKPOINT
    if not pointer.is_file():
        return None
    path = work_dir / pointer.read_text().strip()
    state = load_checkpoint(path)
    check_recipe(path, state.get("trainer", {}).get(STATE_KEY, {}).get("key"), key)
    return int(state["iteration"]) + 1
