"""`sslbench import FORMAT CHECKPOINT --arch ARCH --out RUN_DIR`: another codebase's checkpoint
as a backbone artifact that every evaluator, exporter and transfer task reads."""

from __future__ import annotations

import argparse

import yaml

from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .formats import ALIASES, FORMATS
from .importing import AUTO, import_checkpoint

EXAMPLES = """examples:
  sslbench import torchvision resnet50-0676ba61.pth --arch resnet50 --out runs/tv_r50
  sslbench import moco moco_v2_800ep_pretrain.pth.tar --arch resnet50 --out runs/mocov2_r50
  sslbench import moco vit-s-300ep.pth.tar --arch vit_small_patch16_224 --out runs/mocov3_vits
  sslbench import dino checkpoint.pth --arch vit_small_patch16_224 --out runs/dino_vits
  sslbench import solo-learn byol-imagenet.ckpt --arch resnet50 --method byol --out runs/byol
  sslbench import timm model.safetensors --arch vit_base_patch16_224 --method supervised \\
      --out runs/vitb
  sslbench import auto checkpoint.pth --arch resnet50 --method simclr --out runs/r50 \\
      --prefix state_dict.model.encoder. --mean 0 0 0 --std 1 1 1"""


def _arch_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, yaml.safe_load(value)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    parser.add_argument(
        "format",
        metavar="FORMAT",
        choices=[AUTO, *FORMATS, *ALIASES],
        help=f"where the checkpoint comes from: {', '.join([AUTO, *FORMATS])} "
        f"({', '.join(ALIASES)}: mmpretrain); auto detects it from the keys",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="the file (.pth, .pth.tar, .ckpt, .torch, .pkl, .safetensors)",
    )
    parser.add_argument(
        "--arch",
        required=True,
        help="the backbone architecture (resnet18..152, wide_resnet50_2, "
        "vit_{tiny,small,base,large}_patch16_224, timm:NAME)",
    )
    parser.add_argument(
        "--arch-arg",
        dest="arch_args",
        action="append",
        default=[],
        type=_arch_arg,
        metavar="KEY=VALUE",
        help="an architecture argument, e.g. stem=small, img_size=32, pool=avg (repeatable)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="RUN_DIR",
        help="the run directory to write backbone.safetensors and backbone.json",
    )
    parser.add_argument(
        "--method",
        help="the method that trained it (default: what the "
        "format implies; required where it implies none)",
    )
    parser.add_argument(
        "--prefix",
        help="dotted path of the backbone's tensors in the file, "
        "e.g. state_dict.module.encoder. (overrides the format's)",
    )
    parser.add_argument(
        "--mean",
        type=float,
        nargs=3,
        default=list(IMAGENET_MEAN),
        metavar=("R", "G", "B"),
        help="input normalisation mean of [0, 1] RGB (default ImageNet's)",
    )
    parser.add_argument(
        "--std",
        type=float,
        nargs=3,
        default=list(IMAGENET_STD),
        metavar=("R", "G", "B"),
        help="input normalisation std (default ImageNet's)",
    )


def run(args: argparse.Namespace) -> int:
    report = import_checkpoint(
        args.format,
        args.checkpoint,
        arch=args.arch,
        out=args.out,
        arch_kwargs=dict(args.arch_args),
        method=args.method,
        prefix=args.prefix,
        mean=tuple(args.mean),
        std=tuple(args.std),
    )
    print("\n".join(report.lines()))
    return 0
