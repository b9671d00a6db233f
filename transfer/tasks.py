"""The transfer tasks, registered with the core's task registry (`sslbench transfer TASK`).

Each runs as `run(cfg, backbone_dir, out_dir) -> record path` (None on processes other than the
main one) and writes its record through sslbench.results.build_record.
"""

from sslbench.tasks import Task, register_task

register_task(
    Task(
        name="detection",
        command="transfer",
        summary="object detection / instance segmentation (COCO, VOC, synthetic-shapes): "
        "detectron2 (MoCo protocol) or torchvision backend",
        config="transfer.detection.config:load_config",
        run="transfer.detection.run:transfer",
        metric="bbox_AP",
        config_required=True,
    )
)
register_task(
    Task(
        name="segmentation",
        command="transfer",
        summary="semantic segmentation (VOC12aug, Cityscapes, ADE20K, synthetic-shapes) with "
        "mmsegmentation: FCN / UPerNet heads",
        config="transfer.segmentation.config:load_config",
        run="transfer.segmentation.run:transfer",
        metric="mIoU",
        requires=("mmseg",),
        config_required=True,
    )
)
