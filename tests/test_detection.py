"""Detection transfer: the COCO evaluation path, the data checks, the model and schedule pieces,
the detectron2 recipes, and the tiny torchvision recipe end to end through the real CLI.

Detection data: synthetic-shapes at 64 px in the "silhouette" style, the style a short CPU run
can learn from (see sslbench/data/synthetic.py).
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, pretrain_simsiam, random_init_artifact, sslbench, subprocess_env
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sslbench.backbones import build_backbone
from sslbench.config import ConfigError
from sslbench.data import SHAPE_CLASSES, prepare_synthetic_shapes
from sslbench.distributed import CrossProcessBatchNorm
from sslbench.results import read_record
from transfer.detection import load_config
from transfer.detection.config import scale_to_world
from transfer.detection.data import (
    DetectionDataError,
    DetectionDataset,
    index_coco,
    load_coco_json,
    load_data,
    load_voc,
)
from transfer.detection.detectron2_backend import (
    BASE_CONFIGS,
    detectron2_options,
    metrics_from_detectron2,
)
from transfer.detection.evaluate import NO_DETECTIONS, STATS, coco_metrics, score, to_coco_results
from transfer.detection.model import build_detector
from transfer.detection.train import lr_at, precise_bn

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY_RECIPE = ROOT / "configs" / "transfer" / "detection_synthetic_r18_fpn.yaml"
DETECTRON2_RECIPES = sorted((ROOT / "configs" / "transfer").glob("detection_*_r50_*.yaml"))
SHAPES = {
    "image_size": 64,
    "train_per_class": 64,
    "val_per_class": 8,
    "test_per_class": 1,
    "style": "silhouette",
}


def shapes_overrides(root) -> list[str]:
    opts = ", ".join(f"{k}: {v}" for k, v in SHAPES.items())
    return [f"data.root={root}", f"data.options={{{opts}}}", "run.progress=false", "run.threads=1"]


@pytest.fixture(scope="module")
def det_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes64")
    return prepare_synthetic_shapes(root, progress=False, **SHAPES)


# --- COCO evaluation ------------------------------------------------------------------------------


def _gt_output(coco: COCO, image_id: int, label_of: dict) -> dict:
    """The model output that reproduces the ground truth of one image exactly."""
    anns = coco.imgToAnns[image_id]
    boxes = torch.tensor(
        [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ],
        dtype=torch.float64,
    )
    masks = torch.from_numpy(np.stack([coco.annToMask(a) for a in anns])).float()[:, None]
    return {
        "boxes": boxes,
        "labels": torch.tensor([label_of[a["category_id"]] for a in anns]),
        "scores": torch.ones(len(anns)),
        "masks": masks,
    }


def test_perfect_predictions_score_ap_100(det_root):
    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    results = [
        entry
        for image_id in gt.coco.imgs
        for entry in to_coco_results(
            image_id, _gt_output(gt.coco, image_id, gt.label_of), gt.category_of
        )
    ]
    metrics = {**coco_metrics(gt.coco, results, "bbox"), **coco_metrics(gt.coco, results, "segm")}
    # 64 px images hold no object above 96^2 px: COCOeval's APl is -1 and is left out
    assert set(metrics) == {
        f"{t}_{s}" for t in ("bbox", "segm") for s in ("AP", "AP50", "AP75", "APs", "APm")
    }
    assert all(value == 100.0 for value in metrics.values()), metrics


def _hand_built_gt(tmp_path) -> dict:
    """Three 40x40 images, two categories with non-contiguous ids (3: square, 7: bar)."""
    for k in (1, 2, 3):
        Image.new("RGB", (40, 40)).save(tmp_path / f"{k}.png")

    def ann(i, image_id, cat, x, y, w, h):
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        return {
            "id": i,
            "image_id": image_id,
            "category_id": cat,
            "bbox": [x, y, w, h],
            "area": w * h,
            "iscrowd": 0,
            "segmentation": [polygon],
        }

    return {
        "images": [
            {"id": k, "file_name": f"{k}.png", "width": 40, "height": 40} for k in (1, 2, 3)
        ],
        "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "bar"}],
        "annotations": [
            ann(1, 1, 3, 5, 5, 12, 12),
            ann(2, 1, 7, 22, 4, 6, 20),
            ann(3, 2, 3, 10, 10, 20, 20),
            ann(4, 3, 7, 2, 30, 30, 6),
        ],
    }


def test_hand_built_predictions_score_exactly_what_pycocotools_computes(tmp_path):
    classes = ["bar", "square"]  # label 1 = bar (category 7), label 2 = square (category 3)
    gt = index_coco(_hand_built_gt(tmp_path), tmp_path, "hand-built", classes)
    detections = {  # image -> (xyxy box, label, score): hits, a near miss, a wrong class, a miss
        1: [([6, 5, 17, 18], 2, 0.9), ([22, 6, 28, 22], 1, 0.8), ([0, 0, 10, 10], 1, 0.7)],
        2: [([14, 14, 32, 32], 2, 0.6), ([10, 10, 30, 30], 1, 0.95)],
        3: [],
    }
    results, expected = [], []
    category = {1: 7, 2: 3}
    for image_id, dets in detections.items():
        masks = np.zeros((len(dets), 40, 40), np.uint8)
        for k, (box, _, _) in enumerate(dets):
            masks[k, box[1] : box[3], box[0] : box[2]] = 1
        output = {
            "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([d[1] for d in dets], dtype=torch.int64),
            "scores": torch.tensor([d[2] for d in dets]),
            "masks": torch.from_numpy(masks).float()[:, None] * 0.9,
        }
        results += to_coco_results(image_id, output, gt.category_of)
        for k, (box, label, confidence) in enumerate(dets):  # the same, by hand, for COCO
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            expected.append(
                {
                    "image_id": image_id,
                    "category_id": category[label],
                    "score": confidence,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "segmentation": rle,
                }
            )
    reference = COCO()
    reference.dataset = _hand_built_gt(tmp_path)
    reference.createIndex()
    for iou_type in ("bbox", "segm"):
        ours = coco_metrics(gt.coco, results, iou_type)
        evaluator = COCOeval(reference, reference.loadRes(expected), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        direct = {
            f"{iou_type}_{name}": float(100 * v)
            for name, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), evaluator.stats)
            if v >= 0
        }
        assert ours == direct
        assert 0 < ours[f"{iou_type}_AP"] < 100  # the set is neither hopeless nor perfect


def test_no_detection_scores_zero(det_root):
    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    assert coco_metrics(gt.coco, [], "bbox") == {
        f"bbox_{s}": 0.0 for s in ("AP", "AP50", "AP75", "APs", "APm")
    }


def test_score_warns_exactly_when_nothing_was_detected(det_root):
    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    image_id = next(iter(gt.coco.imgs))
    one = to_coco_results(image_id, _gt_output(gt.coco, image_id, gt.label_of), gt.category_of)
    metrics, warnings = score(gt.coco, one, ("bbox", "segm"))
    assert warnings == [] and 0 < metrics["bbox_AP"] < 100 and 0 < metrics["segm_AP"] < 100
    metrics, warnings = score(gt.coco, [], ("bbox", "segm"))
    assert warnings == [NO_DETECTIONS]
    assert metrics == {**coco_metrics(gt.coco, [], "bbox"), **coco_metrics(gt.coco, [], "segm")}


# --- data ----------------------------------------------------------------------------------------


def test_training_samples_flip_boxes_with_their_masks(det_root):
    gt = load_coco_json(det_root / "annotations" / "instances_train.json", det_root, SHAPE_CLASSES)
    dataset = DetectionDataset([gt], train=True, masks=True, flip=True, seed=0)
    flipped = 0
    for i in range(40):
        image, target = dataset[i]
        plain = DetectionDataset([gt], train=True, masks=True)[i][1]
        flipped += not torch.equal(target["masks"], plain["masks"])
        for box, mask in zip(target["boxes"], target["masks"]):
            ys, xs = np.nonzero(mask.numpy())
            assert torch.allclose(
                box,
                torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32),
                atol=1,
            )
        assert image.shape == (3, 64, 64) and set(target["labels"].tolist()) <= set(range(1, 9))
        assert torch.equal(dataset[i][1]["boxes"], target["boxes"])  # same (seed, epoch, i)
    assert 10 <= flipped <= 30


def _edited_annotations(det_root, tmp_path, edit) -> tuple:
    dataset = json.loads((det_root / "annotations" / "instances_val.json").read_text())
    edit(dataset)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(dataset))
    return path


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda d: d["categories"].append({"id": 99, "name": "hexagon"}),
            "category 'hexagon' (id 99) is not in the recipe's data.classes",
        ),
        (
            lambda d: d["images"][3].update(file_name="val/circle/999999.png"),
            "1 image(s) listed but missing under",
        ),
        (
            lambda d: d["annotations"][0].update(category_id=42),
            "has category_id 42, which no category in the file has",
        ),
    ],
)
def test_bad_annotation_files_are_clear_errors(det_root, tmp_path, edit, message):
    path = _edited_annotations(det_root, tmp_path, edit)
    with pytest.raises(DetectionDataError, match="instances.json") as err:
        load_coco_json(path, det_root, SHAPE_CLASSES)
    assert message in str(err.value)


def test_voc_layout_loads_with_detectron2_conventions(tmp_path):
    voc = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    objects = {
        "000005": [("chair", (263, 211, 324, 339), 0), ("chair", (5, 244, 67, 374), 1)],
        "000007": [("car", (141, 50, 500, 330), 0)],
    }
    for stem, objs in objects.items():
        Image.new("RGB", (500, 375)).save(voc / "JPEGImages" / f"{stem}.jpg")
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}"
            f"</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox>"
            f"</object>"
            for n, b, d in objs
        )
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><size><width>500</width><height>375</height></size>{xml}</annotation>"
        )
    classes = ("car", "chair")
    train = load_voc(voc, "trainval", 2007, classes, for_eval=False)
    test = load_voc(voc, "trainval", 2007, classes, for_eval=True)
    first = train.coco.imgToAnns[1][0]
    assert first["bbox"] == [262.0, 210.0, 62.0, 129.0]  # 1-based inclusive -> coordinates
    assert train.label_of == {1: 1, 2: 2}
    assert [a["iscrowd"] for a in train.coco.dataset["annotations"]] == [0, 0, 0]
    assert [a["iscrowd"] for a in test.coco.dataset["annotations"]] == [0, 1, 0]  # difficult
    assert len(DetectionDataset([train], train=True)) == 2
    with pytest.raises(DetectionDataError, match="object class 'chair' is not in"):
        load_voc(voc, "trainval", 2007, ("car",), for_eval=False)
    with pytest.raises(DetectionDataError, match="ImageSets/Main/test.txt not found"):
        load_voc(voc, "test", 2007, classes, for_eval=True)


# --- model, schedule, precise BN -----------------------------------------------------------------


def _model(overrides=(), backbone=None):
    cfg = load_config([TINY_RECIPE], list(overrides))
    backbone = backbone or build_backbone("resnet18", stem="small", width=16)
    return build_detector(backbone, cfg.model, cfg.input, cfg.test, 8, torch.device("cpu")), cfg


def test_norm_choices_and_frozen_stages():
    frozen, _ = _model(["model.norm=FrozenBN", "model.freeze_at=2"])
    body = frozen.backbone.body
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not any(
        p.requires_grad for n in ("conv1", "layer1") for p in getattr(body, n).parameters()
    )
    assert all(p.requires_grad for p in body.layer2.parameters())
    synced, _ = _model(["model.norm=SyncBN", "model.head_norm=SyncBN"])
    assert isinstance(synced.backbone.body.bn1, CrossProcessBatchNorm)
    assert any(isinstance(m, CrossProcessBatchNorm) for m in synced.backbone.fpn.modules())
    assert any(isinstance(m, CrossProcessBatchNorm) for m in synced.roi_heads.mask_head.modules())
    with pytest.raises(ConfigError, match="model.norm='naiveSyncBN' is detectron2-only"):
        _model(["model.norm=naiveSyncBN"])
    with pytest.raises(ConfigError, match="needs the detectron2 backend"):
        _model(["model.head=c4"])


def test_warmup_then_steps():
    cfg = load_config([TINY_RECIPE])
    schedule = scale_to_world(cfg.solver, 1)  # base 0.01, warm-up 50 from x0.001, steps 220, 270
    assert lr_at(0, schedule, 0.1, 0.001) == pytest.approx(1e-5)
    assert lr_at(25, schedule, 0.1, 0.001) == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))
    assert lr_at(50, schedule, 0.1, 0.001) == pytest.approx(0.01)
    assert lr_at(219, schedule, 0.1, 0.001) == pytest.approx(0.01)
    assert lr_at(220, schedule, 0.1, 0.001) == pytest.approx(0.001)
    assert lr_at(299, schedule, 0.1, 0.001) == pytest.approx(0.0001)


def test_precise_bn_sets_running_stats_to_the_mean_of_batch_stats(det_root):
    torch.manual_seed(0)
    model, cfg = _model()
    data = load_data(load_config([TINY_RECIPE], shapes_overrides(det_root)).data, progress=False)
    dataset = DetectionDataset(data.train, train=True, masks=True)
    seen = []
    model.backbone.body.bn1.register_forward_hook(
        lambda m, x, y: seen.append(
            (x[0].mean((0, 2, 3)), x[0].transpose(0, 1).flatten(1).var(1, unbiased=True))
        )
    )
    assert precise_bn(
        model, dataset, 2, 3, torch.device("cpu"), seed=0, num_workers=0, progress=False
    ) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    bn = model.backbone.body.bn1
    assert len(seen) == 3 and bn.momentum == 0.1
    torch.testing.assert_close(bn.running_mean, torch.stack([m for m, _ in seen]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([v for _, v in seen]).mean(0))


# --- the detectron2 recipes ----------------------------------------------------------------------


def test_linear_scaling_rule_follows_detectron2():
    solver = load_config([ROOT / "configs/transfer/detection_coco_mask_rcnn_r50_c4_1x.yaml"]).solver
    same = scale_to_world(solver, 8)
    assert (same.ims_per_batch, same.base_lr, same.max_iter) == (16, 0.02, 90000)
    half = scale_to_world(solver, 4)  # 2 images per GPU kept: half the batch, lr, twice the steps
    assert (half.ims_per_batch, half.base_lr, half.max_iter, half.steps, half.warmup_iters) == (
        8,
        0.01,
        180000,
        (120000, 160000),
        2000,
    )
    with pytest.raises(ConfigError, match="cannot be split over 3 processes"):
        tiny = load_config([TINY_RECIPE]).solver
        scale_to_world(tiny, 3)


# MoCo's detectron2 configs, value by value (facebookresearch/moco detection/configs at commit
# d00ef73): *_moco.yaml over the dataset's file over Base-RCNN-C4-BN.yaml, which has no _BASE_
# (so detectron2's get_cfg() defaults). MoCo ships no COCO 1x and no R50-FPN config: the 1x takes
# the schedule of detectron2's Base-RCNN-C4.yaml, the FPN recipe is detectron2's
# Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml with the 1x schedule and MoCo's norm and input.
MOCO_C4 = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "naiveSyncBN",
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
}
MOCO_INPUT = {
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "INPUT.FORMAT": "RGB",
}
COCO_C4 = {
    **MOCO_C4,
    "MODEL.MASK_ON": True,
    "INPUT.MIN_SIZE_TRAIN": (640, 672, 704, 736, 768, 800),
    "INPUT.MIN_SIZE_TEST": 800,
    **MOCO_INPUT,
}
UPSTREAM = {  # recipe -> (detectron2 model-zoo file, None for get_cfg(); the values over it)
    "detection_voc0712_faster_rcnn_r50_c4_24k": (
        None,
        {
            **MOCO_C4,
            "MODEL.MASK_ON": False,
            "MODEL.ROI_HEADS.NUM_CLASSES": 20,
            "INPUT.MIN_SIZE_TRAIN": (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800),
            "INPUT.MIN_SIZE_TEST": 800,
            "SOLVER.STEPS": (18000, 22000),
            "SOLVER.MAX_ITER": 24000,
            "SOLVER.WARMUP_ITERS": 100,
            **MOCO_INPUT,
        },
    ),
    "detection_coco_mask_rcnn_r50_c4_2x": (
        None,
        {**COCO_C4, "SOLVER.STEPS": (120000, 160000), "SOLVER.MAX_ITER": 180000},
    ),
    "detection_coco_mask_rcnn_r50_c4_1x": (
        None,
        {**COCO_C4, "SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000},
    ),
    "detection_coco_mask_rcnn_r50_fpn_1x": (
        "Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml",
        {
            "SOLVER.STEPS": (60000, 80000),
            "SOLVER.MAX_ITER": 90000,
            "MODEL.BACKBONE.FREEZE_AT": 0,
            **{
                f"MODEL.{k}.NORM": "naiveSyncBN"
                for k in ("RESNETS", "FPN", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
            },
            **MOCO_INPUT,
        },
    ),
}
# What the run decides, not the protocol: weights, datasets, output, device, seed, loader workers.
RUN_KEYS = (
    "MODEL.WEIGHTS",
    "MODEL.DEVICE",
    "DATASETS.TRAIN",
    "DATASETS.TEST",
    "OUTPUT_DIR",
    "SEED",
    "DATALOADER.NUM_WORKERS",
)


def _recipe_options(recipe, device="cuda") -> dict:
    cfg = load_config([recipe])
    manifest = {"arch": "resnet50", "arch_kwargs": {"stem": "imagenet"}}
    return detectron2_options(
        cfg,
        manifest,
        weights="w.pkl",
        train=["t0", "t1"],
        test="v",
        num_classes=len(cfg.data.classes),
        output_dir="out",
        device=device,
    )


@pytest.mark.parametrize("recipe", DETECTRON2_RECIPES, ids=lambda p: p.stem)
def test_detectron2_recipes_set_what_moco_sets(recipe):
    cfg = load_config([recipe])
    assert cfg.backend == "detectron2" and cfg.backbone.arch == "resnet50"
    opts = _recipe_options(recipe)
    base, upstream = UPSTREAM[recipe.stem]
    ours = {k: opts[k] for k in upstream if k in opts}
    assert ours == {k: v for k, v in upstream.items() if k in opts}
    from_base = {"MODEL.META_ARCHITECTURE"} if base is None else set()  # BASE_CONFIGS has it
    assert set(upstream) - set(opts) == from_base
    assert opts["SOLVER.REFERENCE_WORLD_SIZE"] == 8  # upstream: 0 (no rescaling), run on 8 GPUs
    assert opts["DATASETS.TRAIN"] == ("t0", "t1") and opts["MODEL.WEIGHTS"] == "w.pkl"
    if recipe.stem.startswith("detection_voc"):
        assert cfg.data.name == "voc" and [(s.dir, s.split) for s in cfg.data.train] == [
            ("VOCdevkit/VOC2007", "trainval"),
            ("VOCdevkit/VOC2012", "trainval"),
        ]
    else:
        assert cfg.data.name == "coco" and len(cfg.data.classes) == 80
    switched = load_config([recipe], ["model.norm=SyncBN"])
    assert (
        detectron2_options(
            switched,
            {"arch": "resnet50", "arch_kwargs": {}},
            weights="w",
            train=["t"],
            test="v",
            num_classes=80,
            output_dir="o",
            device="cuda",
        )["MODEL.RESNETS.NORM"]
        == "SyncBN"
    )


def _flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("recipe", DETECTRON2_RECIPES, ids=lambda p: p.stem)
def test_detectron2_builds_moco_upstream_config_and_norms(recipe):
    """detectron2's whole config from a recipe equals upstream's (MoCo's chain over detectron2's
    defaults, or the FPN reference) key by key, and the model it builds normalises with
    naiveSyncBN wherever it normalises: backbone, res5 head and its extra norm, FPN, heads."""
    pytest.importorskip("detectron2")
    from detectron2 import model_zoo
    from detectron2.config import get_cfg
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.modeling import build_model

    from transfer.detection import detectron2_trainer

    opts = _recipe_options(recipe, device="cpu")
    built = detectron2_trainer.build_config(BASE_CONFIGS[load_config([recipe]).model.head], opts)
    base, upstream = UPSTREAM[recipe.stem]
    reference = get_cfg()
    if base is not None:
        reference.merge_from_file(model_zoo.get_config_file(base))
    values = {**upstream, **{k: opts[k] for k in RUN_KEYS}}
    reference.merge_from_list([item for pair in values.items() for item in pair])
    ours, reference = _flat(built), _flat(reference)
    differ = {
        k: (ours.get(k), reference.get(k))
        for k in ours.keys() | reference.keys()
        if ours.get(k) != reference.get(k)
    }
    assert differ == {"SOLVER.REFERENCE_WORLD_SIZE": (8, 0)}

    model = build_model(built)
    norms = {
        name: type(m)
        for name, m in model.named_modules()
        if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))
        or type(m).__name__ == "FrozenBatchNorm2d"
    }
    assert set(norms.values()) == {NaiveSyncBatchNorm}
    expected = (
        ["backbone.stem.conv1.norm", "roi_heads.res5.0.conv1.norm", "roi_heads.res5.norm"]
        if "_c4_" in recipe.stem
        else [
            "backbone.bottom_up.stem.conv1.norm",
            "backbone.fpn_lateral2.norm",
            "roi_heads.box_head.conv1.norm",
            "roi_heads.mask_head.mask_fcn1.norm",
        ]
    )
    assert set(expected) <= set(norms), sorted(norms)


def test_detectron2_metrics_become_record_metrics(det_root):
    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    results = {
        "bbox": {
            "AP": 38.9,
            "AP50": 59.6,
            "AP75": 42.0,
            "APs": 22.1,
            "APm": 42.3,
            "APl": None,
            "AP-person": 51.2,
        },
        "segm": {"AP": 35.1, "AP50": 56.0, "AP75": 37.5, "APs": float("nan")},
    }
    metrics, per_class, warnings = metrics_from_detectron2(results, 17, gt.coco)
    assert metrics == {
        "bbox_AP": 38.9,
        "bbox_AP50": 59.6,
        "bbox_AP75": 42.0,
        "bbox_APs": 22.1,
        "bbox_APm": 42.3,
        "segm_AP": 35.1,
        "segm_AP50": 56.0,
        "segm_AP75": 37.5,
    }
    assert per_class == {"bbox_AP-person": 51.2} and warnings == []


def test_no_detections_through_detectron2_score_as_through_torchvision(det_root):
    """detectron2's COCO evaluator answers NaN (null in JSON) for every metric when nothing was
    detected, its VOC evaluator 0: both become the torchvision backend's result, with its
    warning."""
    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    nothing = {task: {name: None for name in STATS} for task in ("bbox", "segm")}
    torchvision = score(gt.coco, [], ("bbox", "segm"))
    assert metrics_from_detectron2(nothing, 0, gt.coco) == (*torchvision[:1], {}, torchvision[1])
    assert torchvision[0]["bbox_AP"] == 0.0 and torchvision[1] == [NO_DETECTIONS]
    voc = {"bbox": {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}}
    assert metrics_from_detectron2(voc, 0, gt.coco) == (
        {"bbox_AP": 0.0, "bbox_AP50": 0.0, "bbox_AP75": 0.0},
        {},
        [NO_DETECTIONS],
    )


def test_detectron2_coco_evaluator_without_detections_scores_zero(det_root):
    """The real COCOEvaluator on a Mask R-CNN that detected nothing, as the trainer builds it,
    read back by the backend: zeros and the warning, not an error."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset
    from detectron2.structures import Boxes, Instances

    from transfer.detection import detectron2_trainer

    gt = load_coco_json(det_root / "annotations" / "instances_val.json", det_root, SHAPE_CLASSES)
    detectron2_trainer.register(
        [
            (
                "sslbench_no_detections",
                "coco",
                (str(det_root / "annotations" / "instances_val.json"), str(det_root)),
            )
        ]
    )
    cfg = get_cfg()
    cfg.MODEL.MASK_ON = True
    evaluator = detectron2_trainer.Trainer.build_evaluator(cfg, "sslbench_no_detections")

    def detect_nothing(inputs):
        return [
            {
                "instances": Instances(
                    (64, 64),
                    pred_boxes=Boxes(torch.zeros(0, 4)),
                    scores=torch.zeros(0),
                    pred_classes=torch.zeros(0).long(),
                    pred_masks=torch.zeros(0, 64, 64, dtype=torch.bool),
                )
            }
            for _ in inputs
        ]

    images = [[{"image_id": i}] for i in gt.coco.imgs]
    results = inference_on_dataset(detect_nothing, images, evaluator)
    assert results["detections"] == {"count": 0}
    assert all(np.isnan(v) for task in ("bbox", "segm") for v in results[task].values())
    evaluation = {task: {k: None for k in results[task]} for task in ("bbox", "segm")}
    assert metrics_from_detectron2(evaluation, 0, gt.coco) == (
        *score(gt.coco, [], ("bbox", "segm"))[:1],
        {},
        [NO_DETECTIONS],
    )


@pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed here"
)
def test_detectron2_backend_without_detectron2_says_how_to_get_it(tmp_path):
    run_dir = random_init_artifact(tmp_path / "r50", "resnet50")
    proc = sslbench(
        "transfer",
        "detection",
        "--backbone",
        str(run_dir),
        "--config",
        str(DETECTRON2_RECIPES[0]),
        "--out",
        str(tmp_path / "results"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "detectron2 is not on PyPI" in proc.stderr and "docker build" in proc.stderr


@pytest.mark.integration
def test_detectron2_trains_a_few_iterations_on_synthetic_shapes(det_root, tmp_path):
    pytest.importorskip("detectron2")
    # detectron2's R18: 7x7 stem, width 64
    run_dir = random_init_artifact(tmp_path / "r18", "resnet18")
    sslbench(
        "transfer",
        "detection",
        "--backbone",
        str(run_dir),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "results"),
        *shapes_overrides(det_root),
        "backend=detectron2",
        "run.device=cpu",
        "model.norm=BN",
        "model.anchor_sizes=[16,32,64,128,256]",
        "solver.max_iter=4",
        "solver.steps=[3]",
        "solver.warmup_iters=1",
        "test.precise_bn_iters=2",
        cwd=tmp_path,
    )
    record = read_record(next((tmp_path / "results").glob("detection-*.json")))
    assert record.protocol["backend"] == "detectron2" and record.versions["detectron2"]
    assert {"bbox_AP", "segm_AP"} <= set(record.metrics) and record.details["work_dir"]
    detections = record.details["detections"]
    assert record.details["warnings"] == ([] if detections else [NO_DETECTIONS])
    if not detections:  # 4 iterations from random weights: detecting nothing is a fair result
        assert set(record.metrics.values()) == {0.0}


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,overrides,message",
    [
        ("resnet50", [], "backbone is resnet50, but this task needs resnet18"),
        ("resnet18", ["model.arch=retinanet"], "model.arch='retinanet': expected one of"),
        (
            "resnet18",
            ["solver.stepz=[1]"],
            "unknown config key 'solver.stepz' (did you mean 'solver.steps'?)",
        ),
    ],
)
def test_bad_recipe_or_backbone_is_a_clear_error(det_root, tmp_path, arch, overrides, message):
    run_dir = random_init_artifact(tmp_path / arch, arch)
    proc = sslbench(
        "transfer",
        "detection",
        "--backbone",
        str(run_dir),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "results"),
        *shapes_overrides(det_root),
        *overrides,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.distributed
def test_torchrun_processes_split_the_global_batch_and_write_one_record(det_root, tmp_path):
    run_dir = random_init_artifact(tmp_path / "r18", "resnet18", stem="small", width=16)
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "sslbench.cli",
        "transfer",
        "detection",
        "--backbone",
        str(run_dir),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(out),
        *shapes_overrides(det_root),
        "model.norm=SyncBN",
        "solver.max_iter=6",
        "solver.steps=[4]",
        "solver.warmup_iters=2",
        "test.precise_bn_iters=2",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("detection-*.json")
    record = read_record(path)
    assert record.device == "cpu x2" and record.details["world_size"] == 2
    assert record.protocol["solver"]["as_run"]["ims_per_batch"] == 4  # 2 per process
    assert "world_size" not in record.protocol["solver"]["as_run"]


@pytest.fixture(scope="module")
def pretrained(det_root, tmp_path_factory):
    """A SimSiam backbone pretrained on the detection set's images by the real CLI (~20 s)."""
    return pretrain_simsiam(det_root, SHAPES, tmp_path_factory.mktemp("pretrain"), epochs=3)


@pytest.mark.integration
def test_tiny_recipe_trains_a_pretrained_backbone_to_clearly_nonzero_ap(
    pretrained, det_root, tmp_path
):
    out = tmp_path / "results"
    started = time.perf_counter()
    proc = sslbench(
        "transfer",
        "detection",
        "--backbone",
        str(pretrained),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(out),
        *shapes_overrides(det_root),
        "solver.max_iter=150",
        "solver.steps=[110,135]",
        "solver.warmup_iters=20",
        "test.precise_bn_iters=10",
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - started
    record = read_record(next(out.glob("detection-*.json")))
    print(
        f"tiny recipe, 150 iterations: {elapsed:.0f} s; "
        + ", ".join(f"{k}={v:.1f}" for k, v in record.metrics.items())
    )
    assert str(out / record.file_name) in proc.stdout
    assert record.metrics["bbox_AP50"] > 10 and record.metrics["segm_AP50"] > 10
    assert record.task == "detection" and record.backbone.method == "simsiam"
    assert record.dataset.splits == {"train": 512, "test": 64}
    assert record.protocol["solver"]["as_run"]["max_iter"] == 150
    assert record.protocol["data"]["options"]["style"] == "silhouette"
    for name in ("train.csv", "predictions.json", "model_final.pth"):
        assert (Path(record.details["work_dir"]) / name).is_file(), name
    assert record.details["precise_bn_layers"] > 0
