"""The training loop every method shares.

One process on a laptop CPU or many under torchrun (DDP; gloo on CPU, NCCL on GPU). The loop
owns what is method-independent: data order, optimiser and schedule, AMP, clipping, EMA hook,
atomic checkpoints and exact resume, NaN detection, curves and collapse diagnostics, and the
backbone artifact at the end. It also trains the board's baselines (pretrain/baselines.py):
`supervised` is the one method it passes the labels to.

`pretrain` runs the steps in order: check the run directory (`inspect_run_dir`), load the data
(`load_train_data`), build the method, optimiser and schedule (`build_training`), train epoch by
epoch (`train_one_epoch`, `train_step`), checkpoint (`save_resume_state`) and write the artifact
(`finish`). The steps share one `Training` object rather than closures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from sslbench import distributed as D
from sslbench.artifact import MANIFEST_FILE, save_backbone
from sslbench.backbones import build_backbone
from sslbench.backbones.resnet import ARCHS as RESNETS
from sslbench.checkpoint import load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from sslbench.config import NON_SEMANTIC_KEYS, config_hash, save_config, to_dict
from sslbench.data import LabeledDataset, build_dataset
from sslbench.data.shards import ShardDataset
from sslbench.metrics import MetricsLog, plot_curves
from sslbench.optim import build_optimizer, param_groups, scaled_lr, set_lr, warmup_cosine

from .augment_batched import BatchedTwoViews, build_augmentation
from .baselines import CLASSIFICATION, Supervised, classification_views
from .baselines import build as build_method
from .diagnostics import collapse_diagnostics, plot_spectrum, singular_values
from .methods import Method
from .sampling import EpochBatchSampler, MultiViewDataset
from .shard_loader import shard_batches

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
SPECTRUM_FILE = "spectrum.png"


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; the last checkpoint on disk is good."""


class RunDirError(RuntimeError):
    """The run directory holds a run that this invocation must not overwrite."""


@dataclass(frozen=True)
class Schedule:
    """Step counts and the peak learning rate, fixed by the recipe and the dataset's size."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    lr: float  # peak, scaled to the global batch

    @classmethod
    def of(cls, cfg: DictConfig, num_images: int) -> Schedule:
        batch = cfg.optim.batch_size
        steps_per_epoch = num_images // batch
        if steps_per_epoch == 0:
            raise ValueError(
                f"dataset {cfg.data.name} has {num_images} training images, fewer "
                f"than optim.batch_size={batch}"
            )
        return cls(
            steps_per_epoch,
            cfg.train.epochs * steps_per_epoch,
            round(cfg.optim.warmup_epochs * steps_per_epoch),
            scaled_lr(cfg.optim.base_lr, batch),
        )


@dataclass
class Training:
    """What the steps of a run share: the recipe, this process, where the run writes, and the
    state the loop advances (`method`, wrapped as `model` under DDP, its optimiser, the global
    step). `method` is what is saved; `model` is what is called."""

    cfg: DictConfig
    env: D.DistEnv
    run_dir: Path
    config_hash: str
    schedule: Schedule
    method: Method
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int
    log: MetricsLog
    bar: tqdm
    saved_step: int | None = None  # the step of the checkpoint on disk, None before the first
    spectrum: torch.Tensor | None = None  # singular values of the last diagnostics' embeddings
    # The detached losses of the steps since the last finiteness check (`check_finite`): a step
    # only queues its loss, so it never waits for the device.
    unchecked: list[torch.Tensor] = field(default_factory=list)

    @property
    def use_amp(self) -> bool:
        return self.cfg.train.amp and self.env.device.type == "cuda"

    @property
    def takes_labels(self) -> bool:
        return isinstance(self.method, Supervised)


def pretrain(cfg: DictConfig, resume: bool = False) -> Path:
    """Train `cfg.method` and write the backbone artifact; returns the run directory."""
    env = D.init_distributed(cfg.train.device)
    try:
        return _pretrain(cfg, resume, env)
    finally:
        D.shutdown()


def _pretrain(cfg: DictConfig, resume: bool, env: D.DistEnv) -> Path:
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # Decided on the main process, whose filesystem holds the run; every process acts on it
    # (returns, or raises the same error), so none is left waiting in a collective.
    try:
        state = inspect_run_dir(run_dir, cfg, resume) if env.is_main else None
    except RunDirError as err:
        state = err
    state = D.broadcast_object(state)
    if isinstance(state, RunDirError):
        raise state
    if state == "finished":
        if env.is_main:
            print(f"{run_dir}: already finished under this config, nothing to do")
        return run_dir
    torch.manual_seed(cfg.run.seed)  # the weights are initialised from this seed
    if cfg.augment.pipeline == CLASSIFICATION:  # a supervised baseline's one view, in workers
        transform, augment = classification_views(cfg.data.image_size), None
    else:
        transform, augment = build_augmentation(cfg, env.device)
    dataset = load_train_data(cfg, env)
    if env.is_main:  # only once the data is known good: a bad input leaves no run behind
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    views_data = MultiViewDataset(dataset, transform)
    t = build_training(
        cfg, env, run_dir, Schedule.of(cfg, len(dataset)), state == "resume", len(dataset.classes)
    )
    started = time.perf_counter()
    diagnostics: dict[str, float] = {}
    t.model.train()
    loader = EpochLoader(views_data, cfg, env)
    while t.step < t.schedule.total_steps:
        diagnostics = train_one_epoch(t, loader, augment) or diagnostics
    t.bar.close()
    save_resume_state(t)
    if env.is_main:
        finish(t, dataset.describe(), time.perf_counter() - started, diagnostics)
    D.barrier()
    return run_dir


def inspect_run_dir(run_dir: Path, cfg: DictConfig, resume: bool) -> str:
    """ "fresh", "resume" (from the checkpoint) or "finished" (nothing to do). Refuses to clobber
    an existing run, and to resume one under another config, naming the keys that differ."""
    finished = (run_dir / MANIFEST_FILE).exists()
    has_ckpt = (run_dir / CHECKPOINT_FILE).exists()
    if finished and not resume:
        raise RunDirError(
            f"{run_dir} already holds a finished backbone; choose another "
            "run.name or run.output_dir, or delete it"
        )
    if has_ckpt and not resume:
        raise RunDirError(
            f"{run_dir} holds a checkpoint of an unfinished run; pass --resume to "
            "continue it, or choose another run.name"
        )
    if not (finished or has_ckpt):
        return "fresh"
    # The run's config: the artifact's for a finished run, else the one saved when it started
    # (absent only in a directory from before it was saved; the checkpoint's hash still guards).
    if finished:
        theirs = json.loads((run_dir / MANIFEST_FILE).read_text()).get("config")
    else:
        saved = run_dir / CONFIG_FILE
        theirs = OmegaConf.to_container(OmegaConf.load(saved)) if saved.is_file() else None
    differ = config_differences(theirs, to_dict(cfg)) if theirs is not None else []
    if differ:
        held = "a finished backbone" if finished else "an unfinished run"
        raise RunDirError(
            f"{run_dir} holds {held} of another config; --resume needs the same "
            f"one. Differing keys (the run's value -> this one's): "
            f"{'; '.join(differ)}. Choose another run.name to train this config"
        )
    return "finished" if finished else "resume"


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs, leaving out the keys that only
    name or place a run (NON_SEMANTIC_KEYS)."""
    a, b = _flatten(old), _flatten(new)
    unset = "(unset)"
    return [
        f"{k}: {a.get(k, unset)!r} -> {b.get(k, unset)!r}"
        for k in sorted({*a, *b})
        if k not in NON_SEMANTIC_KEYS and a.get(k, unset) != b.get(k, unset)
    ]


def _flatten(node: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_train_data(cfg: DictConfig, env: D.DistEnv) -> LabeledDataset:
    """The training split; the main process generates (if needed) and verifies it first."""
    with D.main_process_first():
        dataset = build_dataset(cfg.data.name, cfg.data.root, "train", **(cfg.data.options or {}))
        if cfg.data.verify and env.is_main:
            dataset.verify(progress=cfg.train.progress)
    return dataset


def backbone_kwargs(cfg: DictConfig) -> dict:
    """The backbone's constructor arguments; the artifact records them to rebuild it. stem,
    zero_init_residual and width are a ResNet's; backbone.kwargs holds any other (a ViT's)."""
    b = cfg.backbone
    resnet = {"stem": b.stem, "zero_init_residual": b.zero_init_residual, "width": b.width}
    return {**(resnet if b.arch in RESNETS else {}), **(to_dict(b.kwargs) if b.kwargs else {})}


def build_training(
    cfg: DictConfig,
    env: D.DistEnv,
    run_dir: Path,
    schedule: Schedule,
    resume: bool,
    num_classes: int,
) -> Training:
    """The method on its device, its optimiser and the step to start from (restored from the
    checkpoint when resuming), the DDP wrapper, the metrics log and the progress bar.
    `num_classes` (the training split's) sizes a supervised baseline's classifier."""
    method = build_method(
        build_backbone(cfg.backbone.arch, **backbone_kwargs(cfg)), cfg.method, num_classes
    )
    if cfg.train.sync_bn and env.world_size > 1:
        method = D.convert_sync_batchnorm(method, env.device)
    method.to(env.device)
    groups = param_groups(
        method,
        cfg.optim.weight_decay,
        cfg.optim.exclude_norm_bias,
        method.param_group_overrides(),
        norm_bias_overrides=method.norm_bias_overrides(),
    )
    extra = {"eta": cfg.optim.lars_eta} if cfg.optim.name == "lars" else {}
    optimizer = build_optimizer(
        cfg.optim.name, groups, schedule.lr, cfg.optim.momentum, cfg.optim.weight_decay, **extra
    )
    chash = config_hash(cfg)
    step = _load_resume_state(run_dir, chash, method, optimizer, env.device) if resume else 0
    model = wrap_ddp(method, env.device) if env.world_size > 1 else method
    if cfg.train.compile:
        model = torch.compile(model)
    log = MetricsLog(run_dir, enabled=env.is_main, resume_step=step if resume else None)
    bar = tqdm(
        total=schedule.total_steps,
        initial=step,
        desc=f"pretrain {cfg.method.name}",
        disable=not (env.is_main and cfg.train.progress),
        dynamic_ncols=True,
    )
    return Training(
        cfg,
        env,
        run_dir,
        chash,
        schedule,
        method,
        model,
        optimizer,
        step,
        log,
        bar,
        saved_step=step if resume else None,
    )


def wrap_ddp(method: Method, device: torch.device) -> DistributedDataParallel:
    """DDP without re-broadcasting buffers at every forward. Every buffer is already equal on
    every process: the MoCo queue and UniGrad's F are updated from gathered batches, EMA targets
    and momenta from equal weights, and BatchNorm's running statistics from the global batch under
    train.sync_bn (the default). Without sync_bn the running statistics of the other processes
    drift from the main one's, which is the one saved, and which a broadcast (from the main
    process) would not have changed either; training forwards read none of them."""
    return DistributedDataParallel(
        method,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def _load_resume_state(
    run_dir: Path,
    chash: str,
    method: Method,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> int:
    """Load the checkpoint's weights, optimiser state and random number generators' states
    (after the method is built, whose initialisation draws from them); return its step."""
    path = run_dir / CHECKPOINT_FILE
    state = load_checkpoint(path, map_location=device)
    if state["config_hash"] != chash:
        raise RunDirError(
            f"{path} was written by a different config (hash "
            f"{state['config_hash'][:12]}… vs {chash[:12]}…); resume needs the "
            "same config"
        )
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], device)
    return int(state["step"])


class EpochLoader:
    """Each epoch's batches. An image folder's come from one DataLoader for the whole run, whose
    workers persist from epoch to epoch (no restart of num_workers processes per epoch): each
    epoch only re-points its batch sampler. Shards stream in an order of their own."""

    def __init__(self, views_data: MultiViewDataset, cfg: DictConfig, env: D.DistEnv):
        self.views_data, self.cfg, self.env = views_data, cfg, env
        self.loader = None
        if isinstance(views_data.base, ShardDataset):
            return
        self.sampler = EpochBatchSampler(
            len(views_data), cfg.optim.batch_size, cfg.run.seed, 0, env.rank, env.world_size
        )
        # The loader draws its workers' base seed from a generator of its own: the global one
        # is the model's (dropout, drop-path), saved in the checkpoint, and a resumed epoch's
        # loader must not draw from it where the uninterrupted run's did not. (The views are
        # seeded per sample, so the workers' seeds do not matter.)
        self.loader = DataLoader(
            views_data,
            batch_sampler=self.sampler,
            num_workers=cfg.data.num_workers,
            persistent_workers=cfg.data.num_workers > 0,
            pin_memory=env.device.type == "cuda",
            generator=torch.Generator(),
        )

    def epoch(self, epoch: int, start: int) -> Iterable:
        """`epoch`'s batches from batch `start` on."""
        if self.loader is None:
            return shard_batches(self.views_data, self.cfg, self.env, epoch, start)
        self.sampler.epoch, self.sampler.start = epoch, start
        return self.loader


def train_one_epoch(
    t: Training, loader: EpochLoader, augment: BatchedTwoViews | None = None
) -> dict[str, float] | None:
    """Train from `t.step` to the end of its epoch; the epoch's collapse diagnostics, over its
    last `train.diagnostics_batches` batches, or None when none of them ran here. With `augment`
    the loader yields uint8 images and their sizes, augmented here on the training device."""
    cfg, env, schedule = t.cfg, t.env, t.schedule
    epoch, start = divmod(t.step, schedule.steps_per_epoch)
    batches = loader.epoch(epoch, start)
    diag_from = max(0, schedule.steps_per_epoch - cfg.train.diagnostics_batches)
    embeddings: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for batch_in_epoch, (views, labels) in enumerate(batches, start=start):
        if augment is not None:
            images, sizes = views
            views = augment(
                images.to(env.device, non_blocking=True),
                sizes,
                (cfg.run.seed, epoch, batch_in_epoch),
                (env.rank, env.world_size),
            )
        out, lr = train_step(t, views, labels)
        if batch_in_epoch >= diag_from:
            embeddings.append(out["embeddings"])
        if t.step % cfg.train.log_every == 0 or t.step == schedule.total_steps:
            _log_train(t, out, lr)
        if t.step % cfg.train.checkpoint_every == 0 and t.step < schedule.total_steps:
            save_resume_state(t)
    return _log_diagnostics(t, embeddings, epoch) if embeddings else None


def train_step(t: Training, views: list[torch.Tensor], labels: torch.Tensor) -> tuple[dict, float]:
    """One optimisation step at the schedule's learning rate; the method's output and that lr.
    The labels reach only a method that takes them (the supervised baseline). Nothing here waits
    for the device: the loss's finiteness is checked later, by `check_finite`."""
    cfg, schedule = t.cfg, t.schedule
    inputs = [[v.to(t.env.device, non_blocking=True) for v in views]]
    if t.takes_labels:
        inputs.append(labels.to(t.env.device, non_blocking=True))
    lr = warmup_cosine(
        t.step,
        schedule.total_steps,
        schedule.warmup_steps,
        schedule.lr,
        cfg.optim.final_lr,
        cfg.optim.warmup_start_lr,
    )
    set_lr(t.optimizer, lr, schedule.lr)
    try:
        with torch.autocast(t.env.device.type, dtype=torch.bfloat16, enabled=t.use_amp):
            out = t.model(*inputs)
        loss = out["loss"]
        t.unchecked.append(loss.detach().float())
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(t.method.parameters(), cfg.optim.clip_grad_norm)
        t.optimizer.step()
        t.method.after_optimizer_step((t.step + 1) / schedule.total_steps)
    except RuntimeError:  # e.g. a decomposition of NaN features: name the cause, not this
        check_finite(t)
        raise
    t.step += 1
    t.bar.update(1)
    return out, lr


def check_finite(t: Training) -> None:
    """Raise NonFiniteLossError naming the first step since the last check whose loss was not
    finite. One device sync for all those steps; the loop calls it at every log step, before
    every checkpoint and before the diagnostics, so no weights a non-finite loss produced are
    saved (`save_resume_state` also refuses non-finite weights)."""
    if not t.unchecked:
        return
    losses, first = torch.stack(t.unchecked), t.step - len(t.unchecked)
    t.unchecked.clear()
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        step = first + bad[0]
        epoch = step // t.schedule.steps_per_epoch
        raise NonFiniteLossError(
            f"loss is {losses[bad[0]].item()} at step {step} (epoch {epoch}); {_stopped(t)}"
        )


def _log_train(t: Training, out: dict, lr: float) -> None:
    """The step's loss and the method's logs, averaged over processes (a collective: every
    process calls it at the same steps) in one all-reduce and one copy to the host."""
    check_finite(t)
    scalars = {"loss": out["loss"].detach(), **out["logs"]}
    stacked = torch.stack(
        [torch.as_tensor(v, device=t.env.device).float().reshape(()) for v in scalars.values()]
    )
    values = dict(zip(scalars, D.all_reduce_mean(stacked).tolist()))
    values["lr"] = lr
    t.log.log("train", t.step, values)
    t.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.3g}")


def _stopped(t: Training) -> str:
    """The end of a non-finite stop's message: where the run can be taken up again, and how."""
    where = (
        "There is no last good checkpoint: none was written before it."
        if t.saved_step is None
        else f"The last good checkpoint is {t.run_dir / CHECKPOINT_FILE} (step {t.saved_step})."
    )
    return (
        f"stopped without saving. {where} Lower optim.base_lr, add warm-up, or set "
        "optim.clip_grad_norm."
    )


def _log_diagnostics(
    t: Training, embeddings: list[tuple[torch.Tensor, torch.Tensor | None]], epoch: int
) -> dict[str, float]:
    """Collapse diagnostics of the views' embeddings, gathered from every process (the second
    view's, for the positive cosine, where the method has two), and their spectrum. Every
    process takes part in the gathers; only the main one, which logs and saves them, computes
    them (in float64), and the others return {}."""
    check_finite(t)
    z1 = D.gather_no_grad(torch.cat([z for z, _ in embeddings]))
    z2 = None
    if embeddings[0][1] is not None:
        z2 = D.gather_no_grad(torch.cat([z for _, z in embeddings]))
    if not t.env.is_main:
        return {}
    z1 = z1.float().cpu()
    z2 = None if z2 is None else z2.float().cpu()
    diagnostics = collapse_diagnostics(z1, z2)
    diagnostics["epoch"] = epoch
    t.log.log("diagnostics", t.step, diagnostics)
    t.spectrum = singular_values(z1)
    return diagnostics


def save_resume_state(t: Training) -> None:
    """Write what exact resume needs (main process only, atomically): the method's state, the
    optimiser's, the step and the random number generators' states (every process's are the
    main one's: all seed alike and draw alike). Weights no longer finite are not written over
    the last good checkpoint."""
    check_finite(t)
    if t.env.is_main:
        state = t.method.state_dict()
        bad = next(
            (k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()),
            None,
        )
        if bad is not None:
            raise NonFiniteLossError(f"{bad} is no longer finite at step {t.step}; {_stopped(t)}")
        rng = rng_state(t.env.device)
        save_checkpoint(
            t.run_dir / CHECKPOINT_FILE,
            {
                "step": t.step,
                "config_hash": t.config_hash,
                "method": state,
                "optimizer": t.optimizer.state_dict(),
                "rng": rng,
            },
        )
    t.saved_step = t.step  # on every process: their error messages name it


def finish(t: Training, dataset: dict, train_seconds: float, diagnostics: dict[str, float]) -> None:
    """Write the backbone artifact and the curves' plot (main process only)."""
    cfg = t.cfg
    save_backbone(
        t.run_dir,
        t.method.backbone,
        arch=cfg.backbone.arch,
        arch_kwargs=backbone_kwargs(cfg),
        method=cfg.method.name,
        run_name=cfg.run.name,
        config=to_dict(cfg),
        config_hash=t.config_hash,
        dataset=dataset,
        epochs=cfg.train.epochs,
        steps=t.step,
        seed=cfg.run.seed,
        world_size=t.env.world_size,
        train_seconds=round(train_seconds, 2),
        diagnostics=diagnostics,
    )
    plot_curves(t.run_dir, ("train", "diagnostics"))
    if t.spectrum is not None:
        epoch = int(diagnostics["epoch"]) + 1
        plot_spectrum(
            {f"{cfg.method.name}, epoch {epoch} of {cfg.train.epochs}": t.spectrum},
            t.run_dir / SPECTRUM_FILE,
        )
    t.log.close()
