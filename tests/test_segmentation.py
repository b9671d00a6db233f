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

from helpers import ROOT, TINY_SHAPES, pretrain_simsiam, sslbench, subprocess_env
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


def _artifact(path, arch="resnet18", method="random-init", **kwargs):
    torch.manual_seed(0)
    save_backbone(path, build_backbone(arch, **kwargs), arch=arch, arch_kwargs=kwargs,
                  method=method, run_name=path.name)
    return path


# --- mIoU --------------------------------------------------------------------------------------

def _confusion_metrics(preds, labels, num_classes, ignore=255) -> dict:
    """mIoU, mAcc, aAcc and per-class IoU (percent) from one confusion matrix, in plain numpy;
    a class with no pixel in labels or predictions has no IoU and is left out of the mean."""
    conf = np.zeros((num_classes, num_classes), np.int64)
    for pred, label in zip(preds, labels):
        keep = label != ignore
        conf += np.bincount(num_classes * label[keep] + pred[keep],
                            minlength=num_classes**2).reshape(num_classes, num_classes)
    hits = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = hits / (conf.sum(0) + conf.sum(1) - hits)
        acc = hits / conf.sum(1)
    return {"mIoU": 100 * np.nanmean(iou), "mAcc": 100 * np.nanmean(acc),
            "aAcc": 100 * hits.sum() / conf.sum(), "IoU": 100 * iou}


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
        metric.process({}, [{"pred_sem_seg": {"data": torch.from_numpy(pred)[None]},
                             "gt_sem_seg": {"data": torch.from_numpy(label)[None]}}])
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
@pytest.mark.parametrize("arch,kwargs,dilated,stride", [
    ("resnet18", {"stem": "small", "width": 16}, False, 8),  # the tiny recipe's network
    ("resnet18", {"stem": "imagenet"}, False, 32),
    ("resnet50", {"stem": "imagenet", "width": 16}, True, 8),  # the protocol's D8, narrower
])
def test_every_backbone_tensor_is_loaded_and_counted(tmp_path, arch, kwargs, dilated, stride):
    run_dir = _artifact(tmp_path / "a", arch, **kwargs)
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
        assert [b.layer3[0].conv2.dilation, b.layer3[1].conv2.dilation, b.layer4[0].conv2.dilation,
                b.layer4[1].conv2.dilation] == [(1, 1), (2, 2), (2, 2), (4, 4)]
    else:  # the same network as the artifact's: the same maps
        for ours, name in zip(maps, ("layer1", "layer2", "layer3", "layer4")):
            torch.testing.assert_close(ours, expected[name])


@needs_mmseg
def test_wrong_architecture_or_missing_keys_are_clear_errors(tmp_path):
    from transfer.segmentation.model import load_into_backbone

    r18, manifest = load_backbone(_artifact(tmp_path / "r18", **TINY_R18["arch_kwargs"]))
    r50 = build_backbone("resnet50", stem="small", width=16)
    model, _ = _segmentor(manifest, r18.state_dict())
    with pytest.raises(ArtifactError, match="architecture mismatch") as err:
        load_into_backbone(model.backbone, r50.state_dict(), "resnet50 weights")
    assert "unexpected: layer1.0.bn3" in str(err.value) and "shape mismatch" in str(err.value)
    partial = {k: v for k, v in r18.state_dict().items() if k != "layer4.1.conv2.weight"}
    with pytest.raises(ArtifactError, match="missing: layer4.1.conv2.weight"):
        load_into_backbone(model.backbone, partial, "partial weights")


@pytest.mark.parametrize("overrides,message", [
    (["model.head=deeplab"], "model.head='deeplab': expected one of"),
    (["model.test_mode=slide"], "needs model.test_stride"),
    (["input.crop_size=[32]"], "input.crop_size=[32]: expected two positive numbers"),
    (["solver.max_iter=5"], "unknown config key 'solver.max_iter' (did you mean "
                            "'solver.max_iters'?)"),
    (["data.name=coco"], "unknown segmentation data format 'coco'"),
])
def test_bad_recipe_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config([TINY_RECIPE], overrides)
    assert message in str(err.value)


# --- the published recipes -----------------------------------------------------------------------

PROTOCOLS = {  # crop, iterations, global batch, lr, decode head, dilations, classes, test mode
    "segmentation_voc12aug_fcn_r50_d8_512x512_20k":
        ((512, 512), 20000, 16, 0.01, "FCNHead", (1, 1, 2, 4), 21, "whole"),
    "segmentation_cityscapes_fcn_r50_d8_769x769_40k":
        ((769, 769), 40000, 8, 0.01, "FCNHead", (1, 1, 2, 4), 19, "slide"),
    "segmentation_ade20k_upernet_r50_512x512_160k":
        ((512, 512), 160000, 16, 0.01, "UPerHead", (1, 1, 1, 1), 150, "whole"),
}


def _published(recipe, tmp_path):
    """The recipe's runner config on 4 processes, dumped and re-read as mmengine's config file
    (what the run leaves in its log directory)."""
    from mmengine.config import Config

    cfg = load_config([recipe])
    num_classes = PROTOCOLS[recipe.stem][6]
    settings = runner_config(cfg, R50, num_classes=num_classes, root=tmp_path / "data",
                             work_dir=tmp_path / "work", norm="SyncBN", world_size=4)
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
            "SegmentationClass", "SegmentationClassAug"]
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
    assert protocol(cfg)["data"] == {"name": "synthetic-shapes",
                                     "options": {"style": "silhouette"},
                                     "train_split": "train", "test_split": "val"}
    longer = load_config([TINY_RECIPE], ["solver.max_iters=301"])
    assert protocol(longer) != protocol(cfg)


def test_training_curves_come_from_mmengine_scalars(tmp_path):
    from transfer.segmentation.run import training_curves

    scalars = tmp_path / "scalars.json"
    scalars.write_text('{"lr": 0.01, "loss": 2.5, "decode.loss_ce": 2.0, "iter": 20, "step": 20}\n'
                       '{"lr": 0.005, "loss": 1.5, "decode.loss_ce": 1.2, "iter": 40, "step": 40}\n'
                       '{"aAcc": 80.0, "mIoU": 30.0, "step": 40}\n')
    rows = training_curves(scalars).splitlines()
    assert rows == ["step,decode.loss_ce,loss,lr", "20,2.0,2.5,0.01", "40,1.2,1.5,0.005"]


def test_real_layouts_are_checked_before_training(tmp_path):
    from transfer.segmentation.run import SegmentationDataError, prepare_data

    voc = load_config([RECIPES / "segmentation_voc12aug_fcn_r50_d8_512x512_20k.yaml"],
                      [f"data.root={tmp_path}"])
    with pytest.raises(SegmentationDataError, match="SegmentationClassAug") as err:
        prepare_data(voc.data, progress=False)
    assert "PascalVOCDataset layout" in str(err.value)
    cityscapes = load_config([RECIPES / "segmentation_cityscapes_fcn_r50_d8_769x769_40k.yaml"],
                             [f"data.root={tmp_path}"])
    for sub in ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train/aachen", "gtFine/val"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "gtFine/train/aachen/a_000000_000019_gtFine_labelIds.png").touch()
    with pytest.raises(SegmentationDataError, match="tools/dataset_converters/cityscapes.py"):
        prepare_data(cityscapes.data, progress=False)
    (tmp_path / "gtFine/train/aachen/a_000000_000019_gtFine_labelTrainIds.png").touch()
    assert prepare_data(cityscapes.data, progress=False) == tmp_path


# --- the command line ----------------------------------------------------------------------------

def test_without_mmseg_the_command_says_how_to_install_it(tmp_path):
    run_dir = _artifact(tmp_path / "r18", **TINY_R18["arch_kwargs"])
    code = ("import sys; sys.modules['mmseg'] = None; import transfer.segmentation; "
            "from sslbench.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "transfer", "segmentation", "--backbone",
                           str(run_dir), "--config", str(TINY_RECIPE), "--out",
                           str(tmp_path / "results")], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "needs the 'segmentation' extra" in proc.stderr
    assert "pip install --no-build-isolation -c constraints.txt -e '.[segmentation]'" in proc.stderr


@needs_mmseg
def test_wrong_architecture_artifact_is_refused_by_the_command(shapes_root, tmp_path):
    run_dir = _artifact(tmp_path / "r50", "resnet50", stem="small", width=16)
    proc = sslbench("transfer", "segmentation", "--backbone", str(run_dir), "--config",
                    str(TINY_RECIPE), "--out", str(tmp_path / "results"),
                    *shapes_overrides(shapes_root), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "backbone is resnet50, but this task needs resnet18" in proc.stderr


@pytest.fixture(scope="module")
def pretrained(shapes_root, tmp_path_factory):
    """A SimSiam backbone pretrained on the tiny set's images by the real CLI (~25 s)."""
    return pretrain_simsiam(shapes_root, TINY_SHAPES, tmp_path_factory.mktemp("pretrain"), epochs=10)


def _segment(run_dir: Path, shapes_root, out: Path, cwd: Path) -> tuple:
    started = time.perf_counter()
    # Half the recipe's 300 iterations (~30 s a run): measured on this set, seeds 0 and 1, the
    # pretrained backbone leads random init by ~8 mIoU at 150 iterations and by 4-10 at 300.
    proc = sslbench("transfer", "segmentation", "--backbone", str(run_dir), "--config",
                    str(TINY_RECIPE), "--out", str(out), *shapes_overrides(shapes_root),
                    "solver.max_iters=150", cwd=cwd)
    elapsed = time.perf_counter() - started
    (path,) = out.glob("segmentation-*.json")
    assert str(path) in proc.stdout
    return read_record(path), elapsed


@needs_mmseg
@pytest.mark.integration
def test_tiny_recipe_from_a_pretrained_backbone_beats_random_init(pretrained, shapes_root,
                                                                  tmp_path):
    random_dir = _artifact(tmp_path / "random", **TINY_R18["arch_kwargs"])
    trained, trained_s = _segment(pretrained, shapes_root, tmp_path / "pretrained", tmp_path)
    scratch, scratch_s = _segment(random_dir, shapes_root, tmp_path / "random-init", tmp_path)
    print(f"tiny segmentation recipe, val mIoU: pretrained (SimSiam) {trained.metrics['mIoU']:.2f} "
          f"in {trained_s:.0f} s, random init {scratch.metrics['mIoU']:.2f} in {scratch_s:.0f} s")
    assert trained.metrics["mIoU"] > scratch.metrics["mIoU"] + 3
    assert trained.metrics["mIoU"] > 15  # background and several shapes, not background alone
    assert trained.protocol_id == scratch.protocol_id  # one column of the leaderboard
    record = trained
    assert record.task == "segmentation" and record.backbone.method == "simsiam"
    assert set(record.metrics) == {"mIoU", "mAcc", "aAcc"}
    assert record.dataset.splits == {"train": 512, "test": 64} and record.dataset.num_classes == 9
    assert set(record.details["per_class_IoU"]) == {"background", "arrow", "circle", "crescent",
                                                    "cross", "heart", "square", "star", "triangle"}
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
