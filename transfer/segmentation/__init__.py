"""Semantic segmentation transfer with mmsegmentation (VOC12aug, Cityscapes, ADE20K, shapes).

    cfg = load_config(["configs/transfer/segmentation_synthetic_r18_fcn.yaml"],
                      ["solver.max_iters=100"])
    record_path = transfer(cfg, "runs/simsiam_synthetic_r18", "results")

The artifact goes into mmseg's ResNet or VisionTransformer (loaded strictly, every tensor
counted), under an EncoderDecoder with an FCN or UPerNet head (a ViT's maps through a
MultiLevelNeck), trained by mmengine's Runner and scored by mmseg's IoUMetric. mmseg is an
optional extra (`pip install ... '.[segmentation]'`); this package imports without it and says
how to install it when a run needs it.
"""

from .config import load_config
from .run import transfer

__all__ = ["load_config", "transfer"]
