"""The training loop every method shares.

One process on a laptop CPU or many under torchrun (DDP; gloo on CPU, NCCL on GPU). The loop
owns what is method-independent: data order, optimiser and schedule, AMP, clipping, EMA hook,
atomic checkpoints and exact resume, NaN detection, curves and collapse diagnostics, and the
backbone artifact at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from sslbench import distributed as D
from sslbench.artifact import MANIFEST_FILE, save_backbone
from sslbench.backbones import build_backbone
from sslbench.checkpoint import load_checkpoint, save_checkpoint
from sslbench.config import config_hash, save_config, to_dict
from sslbench.data import build_dataset
from sslbench.metrics import MetricsLog, plot_curves
from sslbench.optim import build_optimizer, param_groups, scaled_lr, set_lr, warmup_cosine

from .augment import MultiViewTransform, build_view_transforms
from .diagnostics import collapse_diagnostics
from .methods import build_method
from .sampling import EpochBatchSampler, MultiViewDataset

CHECKPOINT_FILE = "checkpoint.pt"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint on disk is still good."""


class RunDirError(RuntimeError):
    """The run directory holds a run that this invocation must not overwrite."""


def _prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """Return whether to resume from a checkpoint; refuse to clobber an existing run."""
    finished = (run_dir / MANIFEST_FILE).exists()
    has_ckpt = (run_dir / CHECKPOINT_FILE).exists()
    if finished and not resume:
        raise RunDirError(f"{run_dir} already holds a finished backbone; choose another "
                          "run.name or run.output_dir, or delete it")
    if has_ckpt and not resume:
        raise RunDirError(f"{run_dir} holds a checkpoint of an unfinished run; pass --resume to "
                          "continue it, or choose another run.name")
    return resume and has_ckpt


def _views_to(views: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [v.to(device, non_blocking=True) for v in views]


def pretrain(cfg: DictConfig, resume: bool = False) -> Path:
    """Train `cfg.method` and write the backbone artifact; returns the run directory."""
    env = D.init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, resume, env)
    finally:
        D.shutdown()


def _pretrain(cfg: DictConfig, resume: bool, env: D.DistEnv) -> Path:
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if env.is_main and (run_dir / MANIFEST_FILE).exists() and resume:
        print(f"{run_dir}: already finished, nothing to do")
        return run_dir
    do_resume = D.broadcast_object(_prepare_run_dir(run_dir, resume) if env.is_main else None)
    chash = config_hash(cfg)
    torch.manual_seed(cfg.run.seed)

    # Data: the main process generates/verifies first, the others then read.
    def load_data():
        ds = build_dataset(cfg.data.name, cfg.data.root, "train", **(cfg.data.options or {}))
        if cfg.data.verify and env.is_main:
            ds.verify(progress=cfg.train.progress)
        return ds

    if env.is_main:
        dataset = load_data()
    D.barrier()
    if not env.is_main:
        dataset = load_data()
    if env.is_main:  # only once the data is known good: a bad input leaves no run behind
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    transform = MultiViewTransform(build_view_transforms(
        cfg.augment.pipeline, cfg.data.image_size, cfg.augment.crop_min_scale, cfg.augment.blur))
    views_data = MultiViewDataset(dataset, transform)
    global_batch = cfg.optim.batch_size
    steps_per_epoch = len(dataset) // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"dataset {cfg.data.name} has {len(dataset)} training images, fewer "
                         f"than optim.batch_size={global_batch}")
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # Model and optimiser.
    backbone_kwargs = {"stem": cfg.backbone.stem, "zero_init_residual": cfg.backbone.zero_init_residual,
                       "width": cfg.backbone.width}
    backbone = build_backbone(cfg.backbone.arch, **backbone_kwargs)
    method = build_method(backbone, cfg.method)
    if cfg.train.sync_bn and env.world_size > 1:
        method = D.convert_sync_batchnorm(method, env.device)
    method.to(env.device)
    lr = scaled_lr(cfg.optim.base_lr, global_batch)
    groups = param_groups(method, cfg.optim.weight_decay, cfg.optim.exclude_norm_bias,
                          method.param_group_overrides(),
                          norm_bias_overrides=method.norm_bias_overrides())
    extra = {"eta": cfg.optim.lars_eta} if cfg.optim.name == "lars" else {}
    optimizer = build_optimizer(cfg.optim.name, groups, lr, cfg.optim.momentum,
                                cfg.optim.weight_decay, **extra)
    step = 0
    if do_resume:
        state = load_checkpoint(run_dir / CHECKPOINT_FILE, map_location=env.device)
        if state["config_hash"] != chash:
            raise RunDirError(f"{run_dir / CHECKPOINT_FILE} was written by a different config "
                              f"(hash {state['config_hash'][:12]}… vs {chash[:12]}…); resume "
                              "needs the same config")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    model = method
    if env.world_size > 1:
        model = DistributedDataParallel(
            method, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    log = MetricsLog(run_dir, enabled=env.is_main, resume_step=step if do_resume else None)
    use_amp = cfg.train.amp and env.device.type == "cuda"
    diag_from = max(0, steps_per_epoch - cfg.train.diagnostics_batches)
    diag_buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
    diagnostics: dict[str, float] = {}

    def save_resume_state() -> None:
        if env.is_main:
            save_checkpoint(run_dir / CHECKPOINT_FILE, {
                "step": step, "config_hash": chash, "method": method.state_dict(),
                "optimizer": optimizer.state_dict()})

    bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {cfg.method.name}",
               disable=not (env.is_main and cfg.train.progress), dynamic_ncols=True)
    started = time.perf_counter()
    model.train()
    while step < total_steps:
        epoch, start = divmod(step, steps_per_epoch)
        sampler = EpochBatchSampler(len(dataset), global_batch, cfg.run.seed, epoch,
                                    env.rank, env.world_size, start)
        loader = DataLoader(views_data, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                            pin_memory=env.device.type == "cuda")
        for batch_in_epoch, (views, _) in enumerate(loader, start=start):
            views = _views_to(views, env.device)
            lr_now = warmup_cosine(step, total_steps, warmup_steps, lr, cfg.optim.final_lr,
                                   cfg.optim.warmup_start_lr)
            set_lr(optimizer, lr_now, lr)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = model(views)
            loss = out["loss"]
            if not torch.isfinite(loss.detach()).item():
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at step {step} (epoch {epoch}); stopped without "
                    f"saving. The last good checkpoint is {run_dir / CHECKPOINT_FILE} if it "
                    "exists. Lower optim.base_lr, add warm-up, or set optim.clip_grad_norm.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(method.parameters(), cfg.optim.clip_grad_norm)
            optimizer.step()
            method.after_optimizer_step((step + 1) / total_steps)
            step += 1
            bar.update(1)
            if batch_in_epoch >= diag_from:
                diag_buffer.append(out["embeddings"])
            if step % cfg.train.log_every == 0 or step == total_steps:
                scalars = {"loss": loss.detach(), **out["logs"]}
                values = {k: D.all_reduce_mean(torch.as_tensor(v, device=env.device).float()).item()
                          for k, v in scalars.items()}
                values["lr"] = lr_now
                log.log("train", step, values)
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr_now:.3g}")
            if step % cfg.train.checkpoint_every == 0 and step < total_steps:
                save_resume_state()
        if diag_buffer:
            z1 = D.gather_no_grad(torch.cat([z for z, _ in diag_buffer]))
            z2 = D.gather_no_grad(torch.cat([z for _, z in diag_buffer]))
            diagnostics = collapse_diagnostics(z1.float().cpu(), z2.float().cpu())
            diagnostics["epoch"] = epoch
            log.log("diagnostics", step, diagnostics)
            diag_buffer.clear()
    bar.close()
    save_resume_state()
    if env.is_main:
        save_backbone(
            run_dir, method.backbone, arch=cfg.backbone.arch, arch_kwargs=backbone_kwargs,
            method=cfg.method.name, run_name=cfg.run.name, config=to_dict(cfg),
            config_hash=chash, dataset=dataset.describe(), epochs=cfg.train.epochs,
            steps=step, seed=cfg.run.seed, world_size=env.world_size,
            train_seconds=round(time.perf_counter() - started, 2), diagnostics=diagnostics)
        plot_curves(run_dir, ("train", "diagnostics"))
        log.close()
    D.barrier()
    return run_dir
