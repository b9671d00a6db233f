"""Segmentation transfer: mIoU against a confusion matrix, loading the artifact into mmseg's
ResNet, the published recipes as mmengine configs, the install hint without mmseg, and the tiny
recipe end to end through the real CLI (pretrained against random init).

Data: the session's tiny synthetic-shapes set (32 px silhouettes, 512 train / 64 val images).
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    TINY_SHAPES,
    pretrain_simsiam,
    random_init_artifact,
    sslbench,
    subprocess_env,
)

from sslbench.artifact import ArtifactError, load_backbone, save_backbone
from sslbench.backbones import build_backbone
from sslbench.config import ConfigError
from sslbench.results import read_record
from transfer.segmentation import load_config
from transfer.segmentation.mmseg_config import model_config, runner_config

try:
    import mmseg  # noqa: F401

    MMSEG_MISSING = ""
except ImportError as err:
    MMSEG_MISSING = f"mmsegmentation is not importable ({err}); install the 'segmentation' extra"

try:
    import mmengine  # noqa: F401

    MMENGINE_MISSING = ""
except ImportError as err:
    MMENGINE_MISSING = f"mmengine is not importable ({err}); install the 'segmentation' extra"

needs_mmseg = pytest.mark.skipif(bool(MMSEG_MISSING), reason=MMSEG_MISSING)
RECIPES = ROOT / "configs" / "transfer"
TINY_RECIPE = RECIPES / "segmentation_synthetic_r18_fcn.yaml"
PUBLISHED = sorted(p for p in RECIPES.glob("segmentation_*.yaml") if "_r50_" in p.name)
R50 = {"arch": "resnet50", "arch_kwargs": {"stem": "imagenet"}}
TINY_R18 = {"arch": "resnet18", "arch_kwargs": {"stem": "small", "width": 16}}


def shapes_overrides(root) -> list[str]:
    opts = ", ".join(f"{k}: {v}" for k, v in TINY_SHAPES.items())
    return [f"data.root={root}", f"data.options={{{opts}}}", "run.progress=false", "run.threads=1"]


# --- mIoU --------------------------------------------------------------------------------------


def _confusion_metrics(preds, labels, num_classes, ignore=255) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU (percent) from one confusion matrix, in plain numpy;
    a class with no pixel in labels or predictions has no IoU and is left out of the mean."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for pred, label in zip(preds, labels):
        keep = label != ignore
        conf += np.bincount(
            num_classes * label[keep] + pred[keep], minlength=num_classes**2
        ).reshape(num_classes, num_classes)
    hits = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = hits / (conf.sum(0) + conf.sum(1) - hits)
        acc = hits / conf.sum(1)
    return {
        "mIoU": 100 * np.nanmean(iou),
        "mAcc": 100 * np.nanmean(acc),
        "aAcc": 100 * hits.sum() / conf.sum(),
        "IoU": 100 * iou,
    }


@needs_mmseg
def test_miou_matches_a_numpy_confusion_matrix_with_ignored_pixels():
    from transfer.segmentation.model import require_mmseg

    require_mmseg()
    from transfer.segmentation.components import PerClassIoUMetric

    rng = np.random.default_rng(0)
    classes = [f"c{k}" for k in range(7)]
    preds, labels = [], []
    for shape in [(37, 53), (64, 64), (20, 90), (48, 31)]:
        label = rng.integers(0, 5, shape)  # classes 5 and 6 never labelled
        pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 6, shape))  # 5 predicted
        label[rng.random(shape) < 0.15] = 255  # ignored, whatever is predicted there
        preds.append(pred)
        labels.append(label)
    metric = PerClassIoUMetric(ignore_index=255)
    metric.dataset_meta = {"classes": classes}
    for pred, label in zip(preds, labels):
        metric.process(
            {},
            [
                {
                    "pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
                    "gt_sem_seg": {"data": torch.from_numpy(label)[None]},
                }
            ],
        )
    ours = metric.evaluate(len(preds))
    expected = _confusion_metrics(preds, labels, len(classes))
    for key in ("mIoU", "mAcc", "aAcc"):  # mmseg reports percent rounded to 2 decimals
        assert ours[key] == pytest.approx(expected[key], abs=0.005 + 1e-9), key
    assert ours["IoU.c5"] == 0.0  # predicted, never labelled
    assert np.isnan(ours["IoU.c6"]) and np.isnan(expected["IoU"][6])  # neither: out of the mean
    for k, name in enumerate(classes[:6]):
        assert ours[f"IoU.{name}"] == pytest.approx(expected["IoU"][k], abs=0.005 + 1e-9)
    assert 20 < ours["mIoU"] < 80  # neither hopeless nor perfect


# --- loading the artifact ------------------------------------------------------------------------


def _segmentor(manifest, state, overrides=()):
    from transfer.segmentation.model import build_segmentor

    cfg = load_config([TINY_RECIPE], list(overrides))
    return build_segmentor(model_config(cfg, manifest, 9, "BN"), state, "test backbone", seed=0)


@needs_mmseg
@pytest.mark.parametrize(
    "arch,kwargs,dilated,stride",
    [
        ("resnet18", {"stem": "small", "width": 16}, False, 8),  # the tiny recipe's network
        ("resnet18", {"stem": "imagenet"}, False, 32),
        ("resnet50", {"stem": "imagenet", "width": 16}, True, 8),  # the protocol's D8, narrower
    ],
)
def test_every_backbone_tensor_is_loaded_and_counted(tmp_path, arch, kwargs, dilated, stride):
    run_dir = random_init_artifact(tmp_path / "a", arch, **kwargs)
    backbone, manifest = load_backbone(run_dir)
    state = backbone.state_dict()
    model, report = _segmentor(manifest, state, [f"model.dilated={dilated}"])
    own = model.backbone.state_dict()
    assert set(own) == set(state)  # torchvision's names: no key renamed
    assert report.tensors == len(state) == len(own)
    assert report.parameters == sum(p.numel() for p in backbone.parameters())
    model.init_weights()  # what mmengine's Runner calls again before training: leaves them alone
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.eval()
    backbone.eval()  # running statistics on both sides
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.backbone(x)
        expected = backbone.forward_maps(x)
    assert maps[3].shape[-1] == 64 // stride
    if dilated:  # D8: the last two stages dilate instead of striding, first block at half
        b = model.backbone
        assert [
            b.layer3[0].conv2.dilation,
            b.layer3[1].conv2.dilation,
            b.layer4[0].conv2.dilation,
            b.layer4[1].conv2.dilation,
        ] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    else:  # the same network as the artifact's: the same maps
        for ours, name in zip(maps, ("layer1", "layer2", "layer3", "layer4")):
            torch.testing.assert_close(ours, expected[name])


@needs_mmseg
def test_wrong_architecture_or_missing_keys_are_clear_errors(tmp_path):
    from transfer.segmentation.model import load_into_backbone

    r18, manifest = load_backbone(random_init_artifact(tmp_path / "r18", **TINY_R18["arch_kwargs"]))
    r50 = build_backbone("resnet50", stem="small", width=16)
    model, _ = _segmentor(manifest, r18.state_dict())
    with pytest.raises(ArtifactError, match="architecture mismatch") as err:
        load_into_backbone(model.backbone, r50.state_dict(), "resnet50 weights")
    assert "unexpected: layer1.0.bn3" in str(err.value) and "shape mismatch" in str(err.value)
    partial = {k: v for k, v in r18.state_dict().items() if k != "layer4.1.conv2.weight"}
    with pytest.raises(ArtifactError, match="missing: layer4.1.conv2.weight"):
        load_into_backbone(model.backbone, partial, "partial weights")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.head=deeplab"], "model.head='deeplab': expected one of"),
        (["model.test_mode=slide"], "needs model.test_stride"),
        (["input.crop_size=[32]"], "input.crop_size=[32]: expected two positive numbers"),
        (
            ["solver.max_iter=5"],
            "unknown config key 'solver.max_iter' (did you mean 'solver.max_iters'?)",
        ),
        (["data.name=coco"], "unknown segmentation data format 'coco'"),
    ],
)
def test_bad_recipe_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([TINY_RECIPE], overrides)
    assert message in str(err.value)


# --- the published recipes -----------------------------------------------------------------------

PROTOCOLS = {  # crop, iterations, global batch, lr, decode head, dilations, classes, test mode
    "segmentation_voc12aug_fcn_r50_d8_512x512_20k": (
        (512, 512),
        20000,
        16,
        0.01,
        "FCNHead",
        (1, 1, 2, 4),
        21,
        "whole",
    ),
    "segmentation_cityscapes_fcn_r50_d8_769x769_40k": (
        (769, 769),
        40000,
        8,
        0.01,
        "FCNHead",
        (1, 1, 2, 4),
        19,
        "slide",
    ),
    "segmentation_ade20k_upernet_r50_512x512_160k": (
        (512, 512),
        160000,
        16,
        0.01,
        "UPerHead",
        (1, 1, 1, 1),
        150,
        "whole",
    ),
}


def _published(recipe, tmp_path):
    """The recipe's runner config on 4 processes, dumped and re-read as mmengine's config file
    (what the run leaves in its log directory)."""
    from mmengine.config import Config

    cfg = load_config([recipe])
    num_classes = PROTOCOLS[recipe.stem][6]
    settings = runner_config(
        cfg,
        R50,
        num_classes=num_classes,
        root=tmp_path / "data",
        work_dir=tmp_path / "work",
        norm="SyncBN",
        world_size=4,
    )
    Config(settings).dump(tmp_path / "config.py")
    return Config.fromfile(tmp_path / "config.py")


def _train_pipeline(mm):
    dataset = mm.train_dataloader.dataset
    return dataset.get("datasets", [dataset])[0].pipeline


@pytest.mark.skipif(bool(MMENGINE_MISSING), reason=MMENGINE_MISSING)
@pytest.mark.parametrize("recipe", PUBLISHED, ids=lambda p: p.stem)
def test_published_recipes_are_mmengine_configs_with_the_protocol(recipe, tmp_path):
    mm = _published(recipe, tmp_path)
    crop, iters, batch, lr, head, dilations, num_classes, mode = PROTOCOLS[recipe.stem]
    model = mm.model
    assert model.backbone.type == "ResNet" and model.backbone.style == "pytorch"
    assert (model.backbone.depth, model.backbone.norm_cfg.type) == (50, "SyncBN")
    assert not model.backbone.get("deep_stem") and model.backbone.contract_dilation
    assert not model.backbone.get("init_cfg") and not model.get("pretrained")  # loaded by us
    assert tuple(model.backbone.dilations) == dilations
    assert tuple(model.backbone.strides) == ((1, 2, 1, 1) if dilations[3] > 1 else (1, 2, 2, 2))
    assert model.decode_head.type == head and model.decode_head.num_classes == num_classes
    assert model.decode_head.channels == 512 and model.decode_head.dropout_ratio == 0.1
    assert model.decode_head.norm_cfg.type == "SyncBN"
    assert (model.auxiliary_head.in_index, model.auxiliary_head.loss_decode.loss_weight) == (2, 0.4)
    assert tuple(model.data_preprocessor.size) == crop and model.data_preprocessor.bgr_to_rgb
    assert model.data_preprocessor.seg_pad_val == 255 and mm.val_evaluator.ignore_index == 255
    assert model.test_cfg.mode == mode
    crop_step = next(t for t in _train_pipeline(mm) if t.type == "RandomCrop")
    assert tuple(crop_step.crop_size) == crop and crop_step.cat_max_ratio == 0.75
    assert mm.train_dataloader.batch_size * 4 == batch
    assert mm.train_cfg.max_iters == iters and mm.param_scheduler[0].end == iters
    assert (mm.optim_wrapper.optimizer.type, mm.optim_wrapper.optimizer.lr) == ("SGD", lr)
    assert mm.optim_wrapper.optimizer.weight_decay == 5e-4 and mm.param_scheduler[0].power == 0.9
    assert mm.param_scheduler[0].eta_min == 1e-4 and mm.launcher == "pytorch"
    if recipe.stem.startswith("segmentation_cityscapes"):
        assert model.decode_head.align_corners and tuple(model.test_cfg.stride) == (513, 513)
        assert tuple(model.test_cfg.crop_size) == crop
    if recipe.stem.startswith("segmentation_voc12aug"):
        assert [d.data_prefix.seg_map_path for d in mm.train_dataloader.dataset.datasets] == [
            "SegmentationClass",
            "SegmentationClassAug",
        ]
    if head == "UPerHead":
        assert tuple(model.decode_head.pool_scales) == (1, 2, 3, 6)
        assert list(model.decode_head.in_channels) == [256, 512, 1024, 2048]


@needs_mmseg
@pytest.mark.parametrize("recipe", PUBLISHED, ids=lambda p: p.stem)
def test_published_recipes_build_in_mmseg(recipe, tmp_path):
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS, MODELS, TRANSFORMS

    from transfer.segmentation.mmseg_config import DATASET_TYPES
    from transfer.segmentation.model import require_mmseg

    require_mmseg()
    mm = _published(recipe, tmp_path)
    cfg = load_config([recipe])
    classes = DATASETS.get(DATASET_TYPES[cfg.data.name]).METAINFO["classes"]
    assert len(classes) == PROTOCOLS[recipe.stem][6]
    with DefaultScope.overwrite_default_scope(mm.default_scope):  # as the Runner builds them
        built = MODELS.build(mm.model)  # mmseg accepts every section
        for step in _train_pipeline(mm) + mm.val_dataloader.dataset.pipeline:
            TRANSFORMS.build(step)
    assert type(built.decode_head).__name__ == PROTOCOLS[recipe.stem][4]
    assert type(built.backbone).__name__ == "ResNet"


def test_protocol_holds_what_changes_the_number_and_not_paths():
    from transfer.segmentation.run import protocol

    cfg = load_config([TINY_RECIPE], ["data.root=/somewhere", "run.num_workers=3"])
    moved = load_config([TINY_RECIPE], ["data.root=/elsewhere", "solver.val_interval=100"])
    assert protocol(cfg) == protocol(moved)  # where the data lies, how often it is looked at
    assert protocol(cfg)["data"] == {
        "name": "synthetic-shapes",
        "options": {"style": "silhouette"},
        "train_split": "train",
        "test_split": "val",
    }
    longer = load_config([TINY_RECIPE], ["solver.max_iters=301"])
    assert protocol(longer) != protocol(cfg)


def test_training_curves_come_from_mmengine_scalars(tmp_path):
    from transfer.segmentation.run import training_curves

    scalars = tmp_path / "scalars.json"
    scalars.write_text(
        '{"lr": 0.01, "loss": 2.5, "decode.loss_ce": 2.0, "iter": 20, "step": 20}\n'
        '{"lr": 0.005, "loss": 1.5, "decode.loss_ce": 1.2, "iter": 40, "step": 40}\n'
        '{"aAcc": 80.0, "mIoU": 30.0, "step": 40}\n'
    )
    rows = training_curves(scalars).splitlines()
    assert rows == ["step,decode.loss_ce,loss,lr", "20,2.0,2.5,0.01", "40,1.2,1.5,0.005"]


def test_real_layouts_are_checked_before_training(tmp_path):
    from transfer.segmentation.run import SegmentationDataError, prepare_data

    voc = load_config(
        [RECIPES / "segmentation_voc12aug_fcn_r50_d8_512x512_20k.yaml"], [f"data.root={tmp_path}"]
    )
    with pytest.raises(SegmentationDataError, match="SegmentationClassAug") as err:
        prepare_data(voc.data, progress=False)
    assert "PascalVOCDataset layout" in str(err.value)
    cityscapes = load_config(
        [RECIPES / "segmentation_cityscapes_fcn_r50_d8_769x769_40k.yaml"], [f"data.root={tmp_path}"]
    )
    for sub in ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train/aachen", "gtFine/val"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "gtFine/train/aachen/a_000000_000019_gtFine_labelIds.png").touch()
    with pytest.raises(SegmentationDataError, match="tools/dataset_converters/cityscapes.py"):
        prepare_data(cityscapes.data, progress=False)
    (tmp_path / "gtFine/train/aachen/a_000000_000019_gtFine_labelTrainIds.png").touch()
    assert prepare_data(cityscapes.data, progress=False) == tmp_path


# --- the command line ----------------------------------------------------------------------------


def test_without_mmseg_the_command_says_how_to_install_it(tmp_path):
    run_dir = random_init_artifact(tmp_path / "r18", **TINY_R18["arch_kwargs"])
    code = (
        "import sys; sys.modules['mmseg'] = None; import transfer.segmentation; "
        "from sslbench.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "transfer",
            "segmentation",
            "--backbone",
            str(run_dir),
            "--config",
            str(TINY_RECIPE),
            "--out",
            str(tmp_path / "results"),
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs the 'segmentation' extra" in proc.stderr
    assert "pip install --no-build-isolation -c constraints.txt -e '.[segmentation]'" in proc.stderr


@needs_mmseg
def test_wrong_architecture_artifact_is_refused_by_the_command(shapes_root, tmp_path):
    run_dir = random_init_artifact(tmp_path / "r50", "resnet50", stem="small", width=16)
    proc = sslbench(
        "transfer",
        "segmentation",
        "--backbone",
        str(run_dir),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(tmp_path / "results"),
        *shapes_overrides(shapes_root),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "backbone is resnet50, but this task needs resnet18" in proc.stderr


@pytest.fixture(scope="module")
def pretrained(shapes_root, tmp_path_factory):
    """A SimSiam backbone pretrained on the tiny set's images by the real CLI (~25 s)."""
    return pretrain_simsiam(
        shapes_root, TINY_SHAPES, tmp_path_factory.mktemp("pretrain"), epochs=10
    )


def _segment(run_dir: Path, shapes_root, out: Path, cwd: Path) -> tuple:
    started = time.perf_counter()
    # Half the recipe's 300 iterations (~30 s a run): measured on this set, seeds 0 and 1, the
    # pretrained backbone leads random init by ~8 mIoU at 150 iterations and by 4-10 at 300.
    proc = sslbench(
        "transfer",
        "segmentation",
        "--backbone",
        str(run_dir),
        "--config",
        str(TINY_RECIPE),
        "--out",
        str(out),
        *shapes_overrides(shapes_root),
        "solver.max_iters=150",
        cwd=cwd,
    )
    elapsed = time.perf_counter() - started
    (path,) = out.glob("segmentation-*.json")
    assert str(path) in proc.stdout
    return read_record(path), elapsed


@needs_mmseg
@pytest.mark.integration
def test_tiny_recipe_from_a_pretrained_backbone_beats_random_init(
    pretrained, shapes_root, tmp_path
):
    random_dir = random_init_artifact(tmp_path / "random", **TINY_R18["arch_kwargs"])
    trained, trained_s = _segment(pretrained, shapes_root, tmp_path / "pretrained", tmp_path)
    scratch, scratch_s = _segment(random_dir, shapes_root, tmp_path / "random-init", tmp_path)
    print(
        f"tiny segmentation recipe, val mIoU: pretrained (SimSiam) {trained.metrics['mIoU']:.2f} "
        f"in {trained_s:.0f} s, random init {scratch.metrics['mIoU']:.2f} in {scratch_s:.0f} s"
    )
    assert trained.metrics["mIoU"] > scratch.metrics["mIoU"] + 3
    assert trained.metrics["mIoU"] > 15  # background and several shapes, not background alone
    assert trained.protocol_id == scratch.protocol_id  # one column of the leaderboard
    record = trained
    assert record.task == "segmentation" and record.backbone.method == "simsiam"
    assert set(record.metrics) == {"mIoU", "mAcc", "aAcc"}
    assert record.dataset.splits == {"train": 512, "test": 64} and record.dataset.num_classes == 9
    assert set(record.details["per_class_IoU"]) == {
        "background",
        "arrow",
        "circle",
        "crescent",
        "cross",
        "heart",
        "square",
        "star",
        "triangle",
    }
    loaded = record.details["backbone_loaded"]
    assert loaded["tensors"] == len(load_backbone(pretrained)[0].state_dict())
    assert record.details["norm_layer"] == "BN" and record.device == "cpu"
    assert record.versions["mmsegmentation"] == "1.2.2" and record.versions["mmcv"] == "2.1.0"
    work_dir = Path(record.details["work_dir"])
    assert "loss" in (work_dir / "train.csv").read_text().splitlines()[0]
    assert (work_dir / "curves.png").is_file()
    weights = torch.load(work_dir / "model_final.pth", weights_only=True)  # plain tensors
    assert weights["decode_head.conv_seg.weight"].shape == (9, 64, 1, 1)
    assert loaded["tensors"] == sum(k.startswith("backbone.") for k in weights)
    assert list(work_dir.glob("*/*.log")) and list(work_dir.glob("*/vis_data/*.py"))


# --- a ViT backbone ------------------------------------------------------------------------------

VIT_RECIPE = RECIPES / "segmentation_synthetic_vit_tiny_upernet.yaml"
VIT_ADE = RECIPES / "segmentation_ade20k_upernet_vit_b16_512x512_160k.yaml"
TINY_VIT = {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 96, "num_heads": 3}


def _vit_artifact(path, **kwargs):
    """A tiny timm ViT with every tensor drawn at random (LayerNorms and biases too, so a
    swapped pair of names changes the output)."""
    torch.manual_seed(0)
    kwargs = {**TINY_VIT, **kwargs}
    net = build_backbone("vit_tiny_patch16_224", **kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_backbone(
        path,
        net,
        arch="vit_tiny_patch16_224",
        arch_kwargs=kwargs,
        method="random-init",
        run_name=path.name,
    )
    return load_backbone(path)


def _vit_segmentor(manifest, state, crop=(16, 16)):
    """The tiny ViT recipe's segmentor at `crop`, the artifact loaded."""
    from transfer.segmentation.model import build_segmentor

    cfg = load_config([VIT_RECIPE], [f"input.crop_size=[{crop[0]}, {crop[1]}]"])
    return build_segmentor(model_config(cfg, manifest, 9, "BN"), state, "test ViT", seed=0)


@needs_mmseg
def test_vit_blocks_in_mmseg_compute_timms_features(tmp_path):
    """Renamed into mmseg's VisionTransformer, the artifact's ViT gives timm's own intermediate
    block outputs (timm's forward_intermediates) and, after the last block, its final-normed
    tokens (forward_features), as maps, on the same input."""
    from transfer.segmentation.vit_weights import mmseg_name

    backbone, manifest = _vit_artifact(tmp_path / "vit")
    state = backbone.state_dict()
    model, report = _vit_segmentor(manifest, state)
    own = model.backbone.state_dict()
    assert set(own) == {mmseg_name(k) for k in state}  # every tensor has its place, one each
    assert report.tensors == len(state) == len(own) and report.resized == ()
    assert report.parameters == sum(p.numel() for p in backbone.parameters())
    model.init_weights()  # the Runner's call: leaves the loaded weights alone
    for key, value in state.items():
        assert torch.equal(model.backbone.state_dict()[mmseg_name(key)], value), key
    model.eval()
    backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = model.backbone(x)
        blocks = backbone.forward_intermediates(
            x, indices=[0, 1, 2], norm=False, output_fmt="NCHW", intermediates_only=True
        )
        last = backbone.forward_features(x)[:, 1:].transpose(1, 2).reshape(2, 96, 4, 4)
    assert len(maps) == 4
    for ours, theirs in zip(maps, [*blocks, last]):
        assert ours.shape == theirs.shape == (2, 96, 4, 4)
        assert (ours - theirs).abs().max() <= 1e-5


@needs_mmseg
def test_vit_position_embedding_is_resampled_as_mmseg_resamples_a_pretrained_one(tmp_path):
    """A 4x4-patch position table read at a 32x48 crop (8x12 patches) equals what mmseg's own
    pretrained-checkpoint path (init_cfg=Pretrained) makes of the same tensors; at the
    artifact's own grid it is not touched."""
    from mmseg.models.backbones import VisionTransformer

    from transfer.segmentation.vit_weights import mmseg_name

    backbone, manifest = _vit_artifact(tmp_path / "vit")
    state = backbone.state_dict()
    model, report = _vit_segmentor(manifest, state, crop=(32, 48))
    assert report.resized == ("pos_embed: 4x4 -> 8x12 patches (bicubic)",)
    checkpoint = tmp_path / "renamed.pth"
    torch.save({mmseg_name(k): v for k, v in state.items()}, checkpoint)
    args = {
        k: v
        for k, v in model_config(
            load_config([VIT_RECIPE], ["input.crop_size=[32, 48]"]), manifest, 9, "BN"
        )["backbone"].items()
        if k != "type"
    }
    reference = VisionTransformer(
        **args, init_cfg={"type": "Pretrained", "checkpoint": str(checkpoint)}
    )
    reference.init_weights()
    ours = model.backbone.pos_embed
    assert ours.shape == reference.pos_embed.shape == (1, 1 + 8 * 12, 96)
    assert torch.equal(ours, reference.pos_embed)
    assert torch.equal(ours[:, 0], state["pos_embed"][:, 0])  # the CLS entry is kept
    same, _ = _vit_segmentor(manifest, state)
    assert torch.equal(same.backbone.pos_embed, state["pos_embed"])


@needs_mmseg
def test_vit_strict_load_refuses_missing_extra_and_misshaped_tensors(tmp_path):
    from transfer.segmentation.model import load_into_backbone

    backbone, manifest = _vit_artifact(tmp_path / "vit")
    state = backbone.state_dict()
    model, _ = _vit_segmentor(manifest, state)

    def load(weights):
        return load_into_backbone(model.backbone, weights, "test ViT")

    missing = {k: v for k, v in state.items() if k != "blocks.3.mlp.fc2.weight"}
    with pytest.raises(ArtifactError, match="missing: layers.3.ffn.layers.1.weight"):
        load(missing)
    for extra in ("blocks.0.ls1.gamma", "reg_token", "fc_norm.weight"):
        with pytest.raises(
            ArtifactError, match=f"no counterpart in mmseg's VisionTransformer: {extra}"
        ):
            load({**state, extra: torch.ones(96)})
    deeper = {**state, "blocks.4.norm1.weight": torch.ones(96)}
    with pytest.raises(ArtifactError, match="unexpected: layers.4.ln1.weight"):
        load(deeper)
    narrow = {**state, "blocks.1.attn.qkv.weight": state["blocks.1.attn.qkv.weight"][:-3]}
    with pytest.raises(ArtifactError, match="shape mismatch: layers.1.attn.attn.in_proj_weight"):
        load(narrow)
    oblong = {**state, "pos_embed": torch.zeros(1, 1 + 2 * 6, 96)}  # no square grid to resample
    with pytest.raises(
        ArtifactError,
        match=r"pos_embed \(1, 13, 96\) is not one CLS entry and a "
        "square grid",
    ):
        load(oblong)


def test_vit_recipe_values_are_checked():
    for overrides, message in [
        (["model.vit.out_indices=[3, 1]"], "model.vit.out_indices=[3, 1]: expected increasing"),
        (["model.vit.neck_scales=[1, 2]"], "one positive scale per entry"),
        (["solver.optimizer=lamb"], "solver.optimizer='lamb': expected one of"),
        (["solver.warmup_iters=300"], "solver.warmup_iters=300"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config([VIT_RECIPE], overrides)
        assert message in str(err.value)
    manifest = {"arch": "vit_tiny_patch16_224", "arch_kwargs": TINY_VIT}
    deep = load_config([VIT_RECIPE], ["model.vit.out_indices=[1, 2, 3, 4]"])
    with pytest.raises(
        ConfigError,
        match=r"out_indices=\[1, 2, 3, 4\]: backbone .* has "
        "blocks 0..3",
    ):
        model_config(deep, manifest, 9, "BN")
    aux = load_config(
        [VIT_RECIPE], ["model.vit.out_indices=[1, 3]", "model.vit.neck_scales=[1, 0.5]"]
    )
    with pytest.raises(ConfigError, match="model.auxiliary_index=3: the backbone gives maps 0..1"):
        model_config(aux, manifest, 9, "BN")


def _upstream_vit_config():
    """mmseg's own ViT-B UPerNet ADE20K config (final LayerNorm + MultiLevelNeck), from the
    configs mmseg installs with itself."""
    from mmengine.config import Config

    path = (
        Path(mmseg.__file__).parent
        / ".mim"
        / "configs"
        / "vit"
        / "vit_vit-b16-ln_mln_upernet_8xb2-160k_ade20k-512x512.py"
    )
    if not path.is_file():
        pytest.skip(f"{path} is not installed with mmseg")
    return Config.fromfile(path)


def _plain(value):
    """Config values compared as JSON would hold them (tuples as lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _differences(ours: dict, theirs: dict, module_type) -> dict:
    """Keys whose values differ, a key one side leaves out compared with the constructor's
    default of `module_type`."""
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(module_type).parameters.items()}
    return {
        k: (ours.get(k, defaults.get(k)), theirs.get(k, defaults.get(k)))
        for k in set(ours) | set(theirs)
        if _plain(ours.get(k, defaults.get(k))) != _plain(theirs.get(k, defaults.get(k)))
    }


@needs_mmseg
def test_vit_b_ade20k_recipe_is_mmsegs_vit_b_recipe(tmp_path):
    """The ViT-B ADE20K recipe, translated for a ViT-B artifact on 8 processes, against mmseg's
    own config key by key. Two differences, on purpose: no `pretrained` path (the artifact is
    loaded strictly instead), and the patch projection keeps its bias (timm's ViT has one;
    mmseg's recipe builds none and its non-strict load drops the pretrained bias unnoticed)."""
    from mmseg.models.backbones import VisionTransformer
    from mmseg.models.decode_heads import FCNHead, UPerHead
    from mmseg.models.necks import MultiLevelNeck

    upstream = _upstream_vit_config()
    manifest = {"arch": "vit_base_patch16_224", "arch_kwargs": {}}
    ours = runner_config(
        load_config([VIT_ADE]),
        manifest,
        num_classes=150,
        root=tmp_path / "data",
        work_dir=tmp_path / "work",
        norm="SyncBN",
        world_size=8,
    )
    model, theirs = ours["model"], upstream.model
    assert _differences(model["backbone"], theirs.backbone, VisionTransformer) == {
        "patch_bias": (True, False)
    }
    assert theirs.pretrained and "pretrained" not in model
    assert _differences(model["neck"], theirs.neck, MultiLevelNeck) == {}
    assert _differences(model["decode_head"], theirs.decode_head, UPerHead) == {}
    assert _differences(model["auxiliary_head"], theirs.auxiliary_head, FCNHead) == {}
    assert _plain(model["test_cfg"]) == _plain(theirs.test_cfg)
    preprocess = {k: v for k, v in theirs.data_preprocessor.items() if k != "size"}
    assert _plain({k: model["data_preprocessor"][k] for k in preprocess}) == _plain(preprocess)
    assert _plain(model["data_preprocessor"]["size"]) == _plain(upstream.crop_size)
    assert _plain(ours["optim_wrapper"]) == _plain({"clip_grad": None, **upstream.optim_wrapper})
    assert _plain(ours["param_scheduler"]) == _plain(upstream.param_scheduler)
    assert ours["train_cfg"]["max_iters"] == upstream.train_cfg.max_iters
    assert ours["train_cfg"]["val_interval"] == upstream.train_cfg.val_interval
    assert ours["train_dataloader"]["batch_size"] == upstream.train_dataloader.batch_size
    assert [t["type"] for t in ours["train_dataloader"]["dataset"]["pipeline"]] == [
        t["type"] for t in upstream.train_pipeline
    ]


@needs_mmseg
def test_vit_recipe_decays_what_mmsegs_vit_recipe_decays(tmp_path):
    """solver.no_decay as mmengine applies it: of the ViT recipes' keys (mmseg's pos_embed,
    cls_token, norm) only the first two match a parameter name, as in mmseg's own run (its
    ViT's LayerNorms are named ln1/ln2): every other parameter keeps the weight decay."""
    from mmengine.optim import build_optim_wrapper

    from transfer.segmentation.mmseg_config import optim_wrapper

    backbone, manifest = _vit_artifact(tmp_path / "vit")
    model, _ = _vit_segmentor(manifest, backbone.state_dict())
    solver = load_config([VIT_ADE]).solver
    assert list(solver.no_decay) == ["pos_embed", "cls_token", "norm"]
    wrapper = build_optim_wrapper(model, optim_wrapper(solver))
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {
        names[id(p)]
        for group in wrapper.optimizer.param_groups
        for p in group["params"]
        if group["weight_decay"] == 0
    }
    assert undecayed == {"backbone.pos_embed", "backbone.cls_token"}
    assert {g["weight_decay"] for g in wrapper.optimizer.param_groups} == {0.0, 0.01}


@needs_mmseg
@pytest.mark.integration
def test_tiny_vit_recipe_runs_through_the_cli_and_writes_a_record(shapes_root, tmp_path):
    _vit_artifact(tmp_path / "vit", freeze_patch_embed=True, sincos_pos_embed=True)
    proc = sslbench(
        "transfer",
        "segmentation",
        "--backbone",
        str(tmp_path / "vit"),
        "--config",
        str(VIT_RECIPE),
        "--out",
        str(tmp_path / "results"),
        *shapes_overrides(shapes_root),
        "solver.max_iters=20",
        "solver.warmup_iters=5",
        cwd=tmp_path,
    )
    (path,) = (tmp_path / "results").glob("segmentation-*.json")
    assert str(path) in proc.stdout
    record = read_record(path)
    assert record.task == "segmentation" and record.backbone.arch == "vit_tiny_patch16_224"
    assert set(record.metrics) == {"mIoU", "mAcc", "aAcc"}
    assert all(0 <= v <= 100 for v in record.metrics.values())
    loaded = record.details["backbone_loaded"]
    assert loaded["tensors"] == len(load_backbone(tmp_path / "vit")[0].state_dict())
    assert loaded["resized"] == ["pos_embed: 4x4 -> 8x8 patches (bicubic)"]
    assert record.protocol["model"]["vit"]["out_indices"] == [0, 1, 2, 3]
    weights = torch.load(Path(record.details["work_dir"]) / "model_final.pth", weights_only=True)
    assert weights["backbone.pos_embed"].shape == (1, 65, 96)
    assert loaded["tensors"] == sum(k.startswith("backbone.") for k in weights)
