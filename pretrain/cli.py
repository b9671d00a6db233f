"""`sslbench pretrain CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse

EPILOG = """Overrides use dotted keys of the recipe, e.g.:
  optim.base_lr=0.1  train.epochs=5  run.name=simsiam_try2  method.stop_gradient=false
An unknown key is an error that names the closest valid key.

The run directory is run.output_dir/run.name. It receives config.yaml (fully resolved),
train.csv and diagnostics.csv (curves), tensorboard/, curves.png, spectrum.png (the singular
values of the last epoch's embeddings), checkpoint.pt (resume state: weights, optimiser, step,
random number generators), and at the end backbone.safetensors + backbone.json (the artifact
evaluators read).
Baselines: method.name=random-init (with train.epochs=0) and method.name=supervised
(configs/pretrain/random_init_*.yaml, supervised_*.yaml).
Several processes: torchrun --nproc_per_node=N -m sslbench.cli pretrain CONFIG ..."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument(
        "config", help="recipe YAML, e.g. configs/pretrain/simsiam_synthetic_r18.yaml"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted-key overrides applied after the YAML",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from run_dir/checkpoint.pt if present; a finished run "
        "is left as it is. Either needs the run's own config: a differing "
        "one is an error naming the keys that differ",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and exit without training",
    )


def run(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from .config import load_pretrain_config

    cfg = load_pretrain_config([args.config], args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    from .engine import pretrain

    run_dir = pretrain(cfg, resume=args.resume)
    print(f"backbone: {run_dir / 'backbone.safetensors'} (manifest {run_dir / 'backbone.json'})")
    return 0
