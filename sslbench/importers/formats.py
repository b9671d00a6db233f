"""Where each source keeps a backbone: one rule table per checkpoint format.

A checkpoint is read as one flat map of dotted paths from the file's root to its tensors
(`{"state_dict": {"module.encoder_q.conv1.weight": t}}` -> "state_dict.module.encoder_q.conv1
.weight"). A `Layout` names the backbone's namespace in that map: the path prefix under which
the architecture's own tensor names sit (after `rename`, for sources that name them otherwise).
Layouts are tried in order and the first holding any of the architecture's tensors is used, so
a preferred copy (DINO's teacher, timm's EMA weights) comes first.

Every table follows the source's own saving code:
- torchvision: `torch.save(model.state_dict())` of torchvision.models (`fc` is the classifier).
- timm: a bare state dict or safetensors (the hub's files), or timm's train checkpoint
  `{"state_dict", "state_dict_ema", "optimizer", "args", ...}`; like timm's own
  `load_state_dict`, the EMA copy is preferred, and a DDP `module.` prefix is accepted.
- moco: facebookresearch/moco (v1/v2) saves `{"state_dict": DDP(MoCo).state_dict()}`: the
  query encoder is `module.encoder_q.` (its `fc` holds the projection), the key encoder
  `module.encoder_k.`, the queue `module.queue`; moco-v3 saves `module.base_encoder.` (its
  `fc` / `head` holds the projector), `module.momentum_encoder.`, `module.predictor.`. MoCo v3's
  ViT-S has 12 heads where timm's has 6 (moco-v3 vits.py); the layout says so.
- dino: facebookresearch/dino saves `{"student", "teacher", "optimizer", "args", ...}`, each
  `MultiCropWrapper(backbone, DINOHead)`, the student (and a BatchNorm teacher) inside DDP
  (`module.`); its released backbones are bare state dicts. Like DINO's evaluation, the
  teacher is preferred.
- solo-learn: a Lightning checkpoint whose `state_dict` holds `backbone.`, `projector.`,
  `momentum_backbone.`, the online `classifier.`, ... (solo/methods/base.py).
- lightly: a Lightning checkpoint of the benchmarks' modules or a plain state dict of lightly's
  model classes: `backbone.` is torchvision's ResNet, or nn.Sequential(*resnet.children()[:-1])
  as in lightly's tutorials (numbered children, renamed here).
- mmpretrain (formerly mmselfsup / mmcls): mmengine's `{"meta", "state_dict", "message_hub",
  ...}` with `backbone.`, `neck.`, `head.`; mmpretrain's ResNet names its tensors as
  torchvision does (style "pytorch"), its ViT is renamed to timm's (names.py).
- vissl: `{"classy_state_dict": {"base_model": {"model": {"trunk", "heads"}}}, ...}` (vissl/
  utils/checkpoint.py); the ResNe(X)t trunk is `_feature_blocks.` with torchvision's names
  (extra_scripts/convert_vissl_to_torchvision.py strips just that prefix).
- detectron2: `{"model": {name: array}}` pickles under detectron2's ResNet names (what
  `sslbench export --to detectron2` and MoCo's convert-pretrain-to-detectron2.py write), or a
  detectron2 training checkpoint whose FPN backbone is `model.backbone.bottom_up.`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import names

MOCO_V3_VIT_HEADS = {"vit_small_patch16_224": {"num_heads": 12}}


@dataclass(frozen=True)
class Layout:
    namespace: str  # dotted path prefix of the backbone's tensors ("" = the file's top level)
    variant: str = ""  # what this layout is, for the report ("MoCo v3", "teacher")
    method: str | Callable[[set[str]], str] | None = None  # implied method; or from the keys
    arch_defaults: dict[str, dict] = field(default_factory=dict)  # arch -> kwargs the source uses


@dataclass(frozen=True)
class Format:
    name: str
    layouts: tuple[Layout, ...]
    slot: str = "classifier"  # what the architecture's classifier slot holds in this source
    groups: tuple[tuple[str, str], ...] = ()  # (path prefix, label) of what is dropped
    rename: Callable[[str], str | None] | None = None  # source name -> architecture name
    # For `auto` only: each entry is a set of path prefixes that must all be present; a format
    # with signatures is a candidate only if one of them is.
    signatures: tuple[tuple[str, ...], ...] = ()
    families: tuple[str, ...] = ()  # the backbone families its rules cover; () = any


def _mocov1_or_v2(keys: set[str]) -> str:
    """MoCo v2 replaced v1's linear projection (fc) by an MLP (fc.0, fc.2)."""
    return "mocov2" if "fc.0.weight" in keys else "mocov1"


def _under(prefixes: tuple[str, ...], *roots: str) -> tuple[Layout, ...]:
    return tuple(Layout(root + prefix) for root in roots for prefix in prefixes)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("torchvision", (Layout("", method="supervised"),)),
        Format(
            "timm",
            _under(("", "module."), "state_dict_ema.", "model_ema.", "state_dict.", "model.", ""),
        ),
        Format(
            "moco",
            (
                Layout("state_dict.module.encoder_q.", "MoCo v1/v2", _mocov1_or_v2),
                Layout(
                    "state_dict.module.base_encoder.",
                    "MoCo v3",
                    "mocov3",
                    arch_defaults=MOCO_V3_VIT_HEADS,
                ),
            ),
            slot="projector",
            groups=(
                ("state_dict.module.encoder_k.", "momentum encoder"),
                ("state_dict.module.momentum_encoder.", "momentum encoder"),
                ("state_dict.module.predictor.", "predictor"),
                ("state_dict.module.queue", "queue"),
            ),
        ),
        Format(
            "dino",
            (
                Layout("teacher.backbone.", "teacher", "dino"),
                Layout("teacher.module.backbone.", "teacher", "dino"),
                Layout("student.module.backbone.", "student", "dino"),
                Layout("", "released backbone", "dino"),
            ),
            groups=(
                ("teacher.head.", "DINO head"),
                ("teacher.module.head.", "DINO head"),
                ("student.", "student"),
                ("dino_loss.", "DINO loss center"),
            ),
        ),
        Format(
            "solo-learn",
            (Layout("state_dict.backbone."),),
            groups=(
                ("state_dict.projector.", "projector"),
                ("state_dict.predictor.", "predictor"),
                ("state_dict.momentum_backbone.", "momentum encoder"),
                ("state_dict.momentum_projector.", "momentum projector"),
                ("state_dict.classifier.", "online classifier"),
                ("state_dict.queue", "queue"),
            ),
            signatures=(("pytorch-lightning_version", "state_dict.classifier."),),
        ),
        Format(
            "lightly",
            (Layout("state_dict.backbone."), Layout("backbone.")),
            rename=names.from_sequential,
            groups=(
                ("state_dict.projection_head.", "projector"),
                ("projection_head.", "projector"),
                ("state_dict.prediction_head.", "predictor"),
                ("prediction_head.", "predictor"),
                ("state_dict.online_classifier.", "online classifier"),
            ),
            signatures=(
                ("state_dict.backbone.", "state_dict.projection_head."),
                ("backbone.", "projection_head."),
            ),
        ),
        Format(
            "mmpretrain",
            (Layout("state_dict.backbone."),),
            rename=names.from_mmpretrain,
            families=("resnet", "vit"),
            groups=(
                ("state_dict.neck.", "neck (projector)"),
                ("state_dict.head.", "head"),
                ("state_dict.target_net.", "momentum encoder"),
                ("state_dict.momentum_encoder.", "momentum encoder"),
                ("state_dict.data_preprocessor.", "data preprocessor"),
            ),
            signatures=(("meta", "state_dict.backbone."),),
        ),
        Format(
            "vissl",
            (Layout("classy_state_dict.base_model.model.trunk._feature_blocks."),),
            families=("resnet",),
            groups=(("classy_state_dict.base_model.model.heads.", "heads"),),
        ),
        Format(
            "detectron2",
            (Layout("model."), Layout("model.backbone.bottom_up."), Layout("")),
            rename=names.from_detectron2,
            families=("resnet",),
        ),
    )
}
ALIASES = {"mmselfsup": "mmpretrain", "mmcls": "mmpretrain"}
