"""Object detection and instance segmentation transfer (COCO, VOC, synthetic-shapes).

    cfg = load_config(["configs/transfer/detection_synthetic_r18_fpn.yaml"],
                      ["solver.max_iter=100"])
    record_path = transfer(cfg, "runs/simsiam_synthetic_r18", "results")

Two backends behind one recipe schema: detectron2 (the MoCo protocol the papers report; GPU,
Docker) and torchvision (Mask R-CNN with ResNet-FPN; runs anywhere, tested in CI).
"""

from .config import load_config
from .run import transfer

__all__ = ["load_config", "transfer"]
