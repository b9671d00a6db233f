"""mmseg's EncoderDecoder built from a recipe, with the artifact's weights in its backbone.

A ResNet's keys are not renamed: mmseg's `ResNet` (style 'pytorch') names its tensors exactly as
torchvision does (conv1, bn1, layerN.M.convK / bnK / downsample.0/1), which is how artifacts
store them. A ViT's go through vit_weights.py's table into mmseg's `VisionTransformer`, its
position embedding resampled to the crop's grid. Either way the weights are loaded strictly
here, after `init_weights()` has drawn the heads, so nothing depends on mmengine's
`init_cfg=Pretrained` (which loads non-strictly, logs what it skipped and runs only inside
`init_weights()`); the Runner's own later `init_weights()` call leaves initialised modules alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslbench.artifact import ArtifactError, load_state_strict
from sslbench.results import distribution_version

from .vit_weights import to_mmseg

INSTALL_HINT = (
    "segmentation transfer needs the 'segmentation' extra (mmsegmentation 1.2.2, mmcv 2.1.0 with "
    "its compiled ops, mmengine, ftfy, regex), which is not importable here ({error}). Install "
    "it into this environment (mmcv compiles from source against the installed torch: half an "
    "hour or more on 2 cores the first time, then pip's cache serves it):\n"
    "  pip install 'setuptools<81' wheel\n"
    "  pip install --no-build-isolation -c constraints.txt -e '.[segmentation]'"
)
DISTRIBUTIONS = ("mmcv", "mmengine", "mmsegmentation")


def require_mmseg() -> dict[str, str | None]:
    """Register sslbench's mmseg components; the versions of mmcv, mmengine and mmseg. A
    RuntimeError saying how to install them when mmseg cannot be imported."""
    try:
        from . import components  # noqa: F401  (imports mmseg, mmcv and mmengine)
    except ImportError as err:
        raise RuntimeError(INSTALL_HINT.format(error=err)) from None
    except AssertionError as err:  # mmseg's own check of the mmcv version it was given
        raise RuntimeError(INSTALL_HINT.format(error=f"mmseg refuses this mmcv: {err}")) from None
    return {dist: distribution_version(dist) for dist in DISTRIBUTIONS}


@dataclass(frozen=True)
class LoadReport:
    """What the artifact put into mmseg's backbone."""

    tensors: int  # state-dict entries loaded: every one the backbone has
    parameters: int  # elements of the backbone's learnable parameters, all of them loaded
    resized: tuple[str, ...] = ()  # tensors resampled to the input size (a ViT's pos_embed)


def load_into_backbone(
    backbone: nn.Module, state: dict[str, torch.Tensor], what: str
) -> LoadReport:
    """Copy `state` (the artifact's names) into mmseg's backbone, refusing any missing,
    unexpected or mis-shaped key, then check every tensor arrived bit for bit."""
    state, resized = _mmseg_state(backbone, state, what)
    load_state_strict(backbone, state, what)
    own = backbone.state_dict()
    differ = [k for k, v in state.items() if not torch.equal(own[k].cpu(), v.cpu())]
    if differ:
        raise ArtifactError(
            f"cannot load {what}: {len(differ)} tensors differ after loading, e.g. {differ[0]}"
        )
    return LoadReport(
        tensors=len(state),
        parameters=sum(p.numel() for p in backbone.parameters()),
        resized=resized,
    )


def _mmseg_state(
    backbone: nn.Module, state: dict[str, torch.Tensor], what: str
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """`state` as mmseg's `backbone` names and sizes it, and what was resampled."""
    from mmseg.models.backbones import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return to_mmseg(state, backbone, what)
    return state, ()


def build_segmentor(
    model_cfg: dict, state: dict[str, torch.Tensor], what: str, seed: int
) -> tuple[nn.Module, LoadReport]:
    """Build the EncoderDecoder (heads drawn from `seed`), then load the backbone strictly."""
    require_mmseg()
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    torch.manual_seed(seed)
    with DefaultScope.overwrite_default_scope("mmseg"):  # SegDataPreProcessor, heads, losses
        model = MODELS.build(ConfigDict(model_cfg))  # attribute access, as from a config file
    model.init_weights()
    return model, load_into_backbone(model.backbone, state, what)
