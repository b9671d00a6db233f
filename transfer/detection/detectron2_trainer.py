"""What runs inside detectron2's launcher processes: dataset registration, MoCo's C4 head, the
config, the trainer. Imports detectron2 at the top, so only detectron2_backend (after checking
that detectron2 is installed) and the tests import it.

Resuming. detectron2's checkpoints (model, optimizer, LR scheduler, iteration) are written every
SOLVER.CHECKPOINT_PERIOD iterations into the work directory, and the same command run again
continues from the newest one (`last_checkpoint`). What detectron2 leaves out for an exact
continuation is added here: each checkpoint also holds the recipe's key (another recipe's
checkpoint is refused) and every process's torch, CUDA, numpy and Python RNG states; a resumed
run creates its data loader iterator from the same seeded state as an uninterrupted run, skips
the batches the checkpoint's iterations consumed (they are read and mapped again, which costs
data-loading time, not training time) and only then restores the RNG states. The next batch and
every random draw after it are then those of an uninterrupted run, so on CPU the final weights
and metrics are bit-identical (measured by tests/test_resume_tasks.py), as long as the run
resumes with the same number of processes and data-loader workers. Checkpoints and the
`last_checkpoint` pointer are written atomically (beside the old file, then renamed), so a kill
while saving leaves the previous checkpoint usable.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from detectron2 import model_zoo
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import (
    COCOEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    PascalVOCDetectionEvaluator,
)
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads
from detectron2.utils import comm

from sslbench.checkpoint import load_checkpoint, require_same_world_size, save_checkpoint
from sslbench.io import write_json_atomic, write_text_atomic

from .detectron2_resume import LAST_CHECKPOINT, STATE_KEY, check_recipe


class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 head of the MoCo protocol: res5 followed by one more norm layer
    (MODEL.RESNETS.NORM). The backbone's features are fine-tuned with normalisation throughout,
    and the extra norm gives the box and mask predictors normalised res5 features too."""

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        res5 = ret["res5"]
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, res5[-1].out_channels))
        return ret


if "Res5ROIHeadsExtraNorm" not in ROI_HEADS_REGISTRY:  # MoCo's own train_net may have it
    ROI_HEADS_REGISTRY.register(Res5ROIHeadsExtraNorm)


COUNT_TASK = "detections"  # the task name DetectionCount reports under


class DetectionCount(DatasetEvaluator):
    """Counts the detections on the test split over all processes: detectron2's evaluators
    do not say whether a zero AP (VOC) or NaN (COCO) means the model detected nothing."""

    def reset(self):
        self._count = 0

    def process(self, inputs, outputs):
        self._count += sum(len(output["instances"]) for output in outputs)

    def evaluate(self):
        counts = comm.gather(self._count, dst=0)
        return {COUNT_TASK: {"count": sum(counts)}} if comm.is_main_process() else None


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer writing each checkpoint and the `last_checkpoint` pointer
    atomically, and reading its own checkpoints with torch.load(weights_only=True) (through
    sslbench.checkpoint, which names a file it refuses). MODEL.WEIGHTS, the exported backbone
    (.pkl), is read by detectron2 as before."""

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        path = Path(self.save_dir) / f"{name}.pth"
        self.logger.info(f"Saving checkpoint to {path}")
        save_checkpoint(path, data)
        self.tag_last_checkpoint(path.name)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        write_text_atomic(Path(self.save_dir) / LAST_CHECKPOINT, last_filename_basename)

    def _torch_load(self, f):
        return load_checkpoint(f)


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as tensors and builtins (what
    torch.load(weights_only=True) reads back)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


class GatherRngStates(hooks.HookBase):
    """Before each checkpoint (after PreciseBN, which draws too), every process's RNG states are
    gathered for the main process, the one that writes the checkpoint."""

    def after_step(self):
        period, done = self.trainer.cfg.SOLVER.CHECKPOINT_PERIOD, self.trainer.iter + 1
        if (period > 0 and done % period == 0) or done >= self.trainer.max_iter:
            self.trainer.rng_states = comm.all_gather(rng_state())


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with the COCO / VOC evaluators and the detection count; the
    main process writes each evaluation's metrics (JSON, NaN as null) and count to
    `results_path`, so the last one, after the last iteration, is what the backend reads.
    Its checkpoints hold the recipe's `key` and every process's RNG states, and a resumed run
    continues the data stream where it stopped (see the module's docstring); the writers
    (metrics.json, the log) write every `log_every` iterations."""

    def __init__(self, cfg, results_path: Path, key: str = "", log_every: int = 20):
        self.key, self.log_every = key, log_every
        self.rng_states: list[dict] = []  # every process's, as of the last checkpoint iteration
        self._restore: dict | None = None  # this process's, from the checkpoint resumed
        super().__init__(cfg)
        self.results_path = results_path

    def build_hooks(self):
        # DefaultTrainer makes its checkpointer just before it builds the hooks: ours replaces it
        # here, before the checkpoint hook takes it.
        old = self.checkpointer
        self.checkpointer = AtomicCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        built = super().build_hooks()
        for hook in built:
            if isinstance(hook, hooks.PeriodicWriter):
                hook._period = self.log_every  # detectron2 fixes 20; the recipe's run.log_every
        at = next(
            i
            for i, h in enumerate(built)
            if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
        )
        return [*built[:at], GatherRngStates(), *built[at:]]

    def state_dict(self):
        return {**super().state_dict(), STATE_KEY: {"key": self.key, "rng": self.rng_states}}

    def load_state_dict(self, state_dict):
        path = self.checkpointer.get_checkpoint_file()
        saved = state_dict.get(STATE_KEY, {})
        check_recipe(Path(path), saved.get("key"), self.key)
        require_same_world_size(path, len(saved["rng"]), comm.get_world_size())
        super().load_state_dict(state_dict)
        self._restore = saved["rng"][comm.get_rank()]

    def resume_or_load(self, resume=True):
        """Continue from the work directory's last checkpoint when `resume` and there is one
        (else start from MODEL.WEIGHTS), with the data stream and RNG states where they were."""
        # The iterator draws its workers' seeds now, from the state every run has here.
        data = self._trainer._data_loader_iter
        super().resume_or_load(resume=resume)
        if self.start_iter < self.max_iter:  # skip the batches the checkpoint has trained on
            for _ in range(self.start_iter):
                next(data)
        if self._restore is not None:
            set_rng_state(self._restore)
            self._restore = None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name):
        if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
            metrics = PascalVOCDetectionEvaluator(dataset_name)
        else:  # tasks named: left to itself it infers them from the predictions, none if none
            tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
            metrics = COCOEvaluator(
                dataset_name, tasks=tasks, output_dir=str(Path(cfg.OUTPUT_DIR) / "inference")
            )
        return DatasetEvaluators([metrics, DetectionCount()])

    def test(self, cfg, model, evaluators=None):
        # An instance method (detectron2's is a classmethod) to reach results_path: detectron2's
        # evaluation hook calls it on the trainer, and nothing here calls it on the class.
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            finite = {
                task: {k: (float(v) if math.isfinite(v) else None) for k, v in vals.items()}
                for task, vals in results.items()
                if task != COUNT_TASK
            }
            write_json_atomic(
                self.results_path, {"metrics": finite, "detections": results[COUNT_TASK]["count"]}
            )
        return results


def register(datasets: list[tuple]) -> None:
    """Register (name, "coco" | "voc", arguments) with detectron2's own loaders."""
    for name, kind, args in datasets:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        if kind == "coco":
            annotations, image_root = args
            register_coco_instances(name, {}, annotations, image_root)
        else:
            dirname, split, year, classes = args
            register_pascal_voc(name, dirname, split, year, class_names=classes)
            MetadataCatalog.get(name).set(evaluator_type="pascal_voc")


def build_config(base_config: str, options: dict[str, Any]):
    """detectron2's config: the model-zoo base file, then `options` (KEY.PATH -> value)."""
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(base_config))
    cfg.merge_from_list([item for pair in options.items() for item in pair])
    cfg.freeze()
    return cfg


def main(
    base_config: str,
    options: dict[str, Any],
    datasets: list[tuple],
    results_path: str,
    key: str = "",
    log_every: int = 20,
) -> None:
    """One process of a detectron2 run: build the config, train (continuing from the work
    directory's last checkpoint, which must hold the recipe's `key`, when there is one), test;
    the main process writes the final metrics and detection count to `results_path`."""
    register(datasets)
    cfg = build_config(base_config, options)
    default_setup(cfg, argparse.Namespace())
    trainer = Trainer(cfg, Path(results_path), key=key, log_every=log_every)
    trainer.resume_or_load(resume=True)
    trainer.train()
