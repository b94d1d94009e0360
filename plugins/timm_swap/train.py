"""A timm-style training script with plugins.

Every flag of timm's ``train.py`` (what each does here, honoured, ignored or refused: ``timm_args.py``), a
``-c/--config`` YAML whose keys are flag names (timm's own ``args.yaml`` of a run included), and a repeatable
``--plugin NAME`` that loads pluggy plugins from the ``timm_swap.plugins`` entry-point group. Without a plugin it
trains a classifier on an ImageFolder; ``--plugin swap`` runs a knowledge swap on a pretrained one::

    timm-swap-train --data-dir DATA --model vit_tiny_patch16_224 --initial-checkpoint pretrained.pth \\
        --num-classes 10 --plugin swap --swap-forget 0 1 --swap-learn-dir NEW_DATA

Run it with ``torchrun --nproc_per_node N`` for DDP (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from kswap import CheckpointMismatchError, StopRequests, SwapConfigError, atomic_save, load_checkpoint

from .context import Step, TrainContext
from .data import check_image_folder, image_folder, resolve_split, resumable_loader
from .evaluation import evaluate_top1
from .models import architecture_kwargs, classifier_heads, creation_kwargs, wrong_model
from .plugins import load_plugins
from .timm_args import ParseKwargs, add_timm_arguments, check_timm_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="timm-style training with plugins (timm_swap)")
    parser.add_argument("-c", "--config", default="", metavar="FILE", help="YAML of flag defaults")
    parser.add_argument("--plugin", action="append", default=[], metavar="NAME",
                        help="enable a plugin from the timm_swap.plugins entry points (repeatable)")

    group = parser.add_argument_group("Dataset parameters")
    group.add_argument("data", nargs="?", metavar="DIR", help="path to dataset (positional is *deprecated*)")
    group.add_argument("--data-dir", metavar="DIR", help="path to dataset (root dir)")
    group.add_argument("--train-split", default="train", help="dataset train split (default: train)")
    group.add_argument("--val-split", default="validation", help="dataset validation split (default: validation)")

    group = parser.add_argument_group("Model parameters")
    group.add_argument("--model", default="resnet50", help="name of the model to train")
    group.add_argument("--pretrained", action="store_true", help="start with the model's pretrained weights")
    group.add_argument("--initial-checkpoint", default="", metavar="PATH", help="load this checkpoint first")
    group.add_argument("--resume", default="", metavar="PATH", help="resume the full run from this checkpoint")
    group.add_argument("--no-resume-opt", action="store_true", help="do not restore the optimizer on resume")
    group.add_argument("--num-classes", type=int, default=None, metavar="N", help="number of label classes")
    group.add_argument("--gp", default=None, metavar="POOL", help="global pool type")
    group.add_argument("--img-size", type=int, default=None, metavar="N", help="image size")
    group.add_argument("--in-chans", type=int, default=None, metavar="N", help="image input channels")
    group.add_argument("--input-size", default=None, nargs=3, type=int, metavar="N N N", help="C H W")
    group.add_argument("--crop-pct", default=None, type=float, metavar="N", help="center crop percentage")
    group.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="pixel mean")
    group.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="pixel std")
    group.add_argument("--interpolation", default="", type=str, metavar="NAME", help="resize interpolation")
    group.add_argument("-b", "--batch-size", type=int, default=128, metavar="N", help="batch size per process")
    group.add_argument("-vb", "--validation-batch-size", type=int, default=None, metavar="N")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra model kwargs")

    group = parser.add_argument_group("Optimizer parameters")
    group.add_argument("--opt", default="sgd", metavar="OPTIMIZER", help="optimizer (timm name)")
    group.add_argument("--opt-eps", default=None, type=float, metavar="EPSILON")
    group.add_argument("--opt-betas", default=None, type=float, nargs="+", metavar="BETA")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M")
    group.add_argument("--weight-decay", type=float, default=2e-5)
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradients")
    group.add_argument("--clip-mode", default="norm", help="norm, value or agc")
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise learning rate decay")

    group = parser.add_argument_group("Learning rate schedule parameters")
    group.add_argument("--sched", default="cosine", metavar="SCHEDULER", help="LR scheduler")
    group.add_argument("--sched-on-updates", action="store_true", help="step the schedule per update")
    group.add_argument("--lr", type=float, default=None, metavar="LR", help="learning rate (default: from --lr-base)")
    group.add_argument("--lr-base", type=float, default=0.1, metavar="LR", help="LR at --lr-base-size batch")
    group.add_argument("--lr-base-size", type=int, default=256, metavar="DIV")
    group.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR")
    group.add_argument("--min-lr", type=float, default=0, metavar="LR")
    group.add_argument("--epochs", type=int, default=300, metavar="N", help="number of epochs to train")
    group.add_argument("--decay-milestones", default=[90, 180, 270], type=int, nargs="+", metavar="MILESTONES")
    group.add_argument("--decay-epochs", type=float, default=90, metavar="N")
    group.add_argument("--warmup-epochs", type=int, default=5, metavar="N")
    group.add_argument("--warmup-prefix", action="store_true", default=False)
    group.add_argument("--cooldown-epochs", type=int, default=0, metavar="N")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE")

    group = parser.add_argument_group("Augmentation and regularization parameters")
    group.add_argument("--no-aug", action="store_true", default=False, help="disable all training augmentation")
    group.add_argument("--scale", type=float, nargs="+", default=[0.08, 1.0], metavar="PCT")
    group.add_argument("--ratio", type=float, nargs="+", default=[3.0 / 4.0, 4.0 / 3.0], metavar="RATIO")
    group.add_argument("--hflip", type=float, default=0.5)
    group.add_argument("--vflip", type=float, default=0.0)
    group.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout rate")
    group.add_argument("--drop-path", type=float, default=None, metavar="PCT", help="drop path rate")

    group = parser.add_argument_group("Miscellaneous parameters")
    group.add_argument("--seed", type=int, default=42, metavar="S")
    group.add_argument("--log-interval", type=int, default=50, metavar="N", help="steps between log lines")
    group.add_argument("--recovery-interval", type=int, default=0, metavar="N",
                       help="steps between recovery checkpoints (0: at epoch and phase ends only)")
    group.add_argument("-j", "--workers", type=int, default=2, metavar="N", help="data loading workers")
    group.add_argument("--output", default="", metavar="PATH", help="output folder (default: ./output/train)")
    group.add_argument("--experiment", default="", metavar="NAME", help="name of the run's sub-folder")
    group.add_argument("--eval-metric", default="top1", metavar="EVAL_METRIC")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--log-wandb", action="store_true", default=False, help="log to Weights & Biases")
    group.add_argument("--wandb-project", default=None, type=str)
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, Any]:
    """Parse the config file and flags; plugins named by ``--plugin`` (or the config) add their flags first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default="")
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    file_cfg: dict[str, Any] = {}
    if known.config:
        with open(known.config) as f:
            file_cfg = yaml.safe_load(f) or {}
    plugins = list(dict.fromkeys([*file_cfg.get("plugin", []), *known.plugin]))
    pm = load_plugins(plugins)
    parser = build_parser()
    add_timm_arguments(parser)
    pm.hook.add_arguments(parser=parser)
    if file_cfg:
        # A key is a dest (as timm's args.yaml writes them) or any long flag's name, "_" for "-".
        dests = {a.dest: a.dest for a in parser._actions}
        dests |= {opt[2:].replace("-", "_"): a.dest for a in parser._actions for opt in a.option_strings
                  if opt.startswith("--")}
        unknown = sorted(k for k in file_cfg if k.replace("-", "_") not in dests)
        if unknown:
            parser.error(f"unknown keys in {known.config}: {unknown}")
        parser.set_defaults(**{dests[k.replace("-", "_")]: v for k, v in file_cfg.items()})
    args = parser.parse_args(argv)
    args.plugin = plugins
    args.data_dir = args.data_dir or args.data
    return args, pm


def init_distributed(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world_size > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, rank, world_size


def create_model(args: argparse.Namespace) -> nn.Module:
    """The timm model, with ``--initial-checkpoint`` loaded after checking its head against ``--num-classes``."""
    import timm
    from timm.models import load_state_dict

    kwargs = creation_kwargs(args)
    if args.pretrained_path:
        # As timm's train.py: the file replaces the pretrained weights' source, its head adapted to --num-classes.
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, **kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise SwapConfigError(f"--model {args.model} does not take the keywords of this run: {err}. "
                              f"{wrong_model(args, args.initial_checkpoint)}") from None
    if args.initial_checkpoint:
        state = load_state_dict(args.initial_checkpoint, use_ema=False)
        for head_name, head in classifier_heads(model).items():
            rows = state.get(f"{head_name}.weight")
            if rows is not None and isinstance(head, nn.Linear) and rows.shape[0] != head.out_features:
                raise SwapConfigError(
                    f"--initial-checkpoint {args.initial_checkpoint} has a {rows.shape[0]}-class head "
                    f"({head_name}.weight {tuple(rows.shape)}), but --num-classes is {head.out_features}. "
                    f"Pass --num-classes {rows.shape[0]} (the classes the checkpoint was trained on)."
                )
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:
            raise CheckpointMismatchError(
                f"--initial-checkpoint {args.initial_checkpoint} does not fit --model {args.model}. "
                f"{wrong_model(args, args.initial_checkpoint, state, model)}"
            ) from None
    # After the checkpoint, as timm (whose create_model loads it first).
    with torch.no_grad():
        for head in classifier_heads(model).values():
            if args.head_init_scale is not None:
                head.weight.mul_(args.head_init_scale)
                head.bias.mul_(args.head_init_scale)
            if args.head_init_bias is not None:
                head.bias.fill_(args.head_init_bias)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    return model


def resolve_lr(args: argparse.Namespace, world_size: int) -> None:
    """timm's rule: without ``--lr``, scale ``--lr-base`` by the global batch size (accumulated micro-batches
    included), linearly or, with ``--lr-base-scale sqrt`` (default for Ada*/LAMB optimizers), by its square root."""
    if args.lr is None:
        ratio = args.batch_size * world_size * args.grad_accum_steps / args.lr_base_size
        scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
        args.lr = args.lr_base * (ratio**0.5 if scale == "sqrt" else ratio)


def build_optimizer(ctx: TrainContext) -> torch.optim.Optimizer:
    """timm's optimizer over the trainable parameters only (frozen ones are skipped by timm's grouping)."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    if not any(p.requires_grad for p in ctx.model.parameters()):
        raise SwapConfigError("The model has no trainable parameter: nothing to optimise.")
    return create_optimizer_v2(ctx.model, **optimizer_kwargs(cfg=ctx.args), **ctx.args.opt_kwargs)


def scheduled_epochs(args: argparse.Namespace, updates_per_epoch: int) -> int:
    """The epochs timm's train.py runs: ``--epochs`` plus what its schedule adds (cooldown, further LR cycles,
    prefixed warmup), as timm's scheduler factory counts them."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    probe = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
    _, epochs = create_scheduler_v2(probe, **{**scheduler_kwargs(args), "updates_per_epoch": updates_per_epoch})
    return epochs


def build_lr_scheduler(ctx: TrainContext, num_epochs: int, updates_per_epoch: int) -> Any:
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs

    kwargs = {**scheduler_kwargs(ctx.args), "num_epochs": num_epochs, "updates_per_epoch": updates_per_epoch}
    scheduler, _ = create_scheduler_v2(ctx.optimizer, **kwargs)
    return scheduler


def prepare_output_dir(args: argparse.Namespace) -> Path:
    """``--resume`` continues in the checkpoint's folder; a new run never reuses an existing folder."""
    if args.resume:
        return Path(args.resume).resolve().parent
    root = Path(args.output or "./output/train")
    name = args.experiment or time.strftime("%Y%m%d-%H%M%S") + f"-{args.model}"
    out, n = root / name, 1
    while out.exists():
        out, n = root / f"{name}-{n}", n + 1
    return out


def default_loaders(ctx: TrainContext) -> dict[str, Any]:
    """Plain training: ``train`` and (when the split exists) ``eval`` loaders of ``--data-dir``."""
    args = ctx.args
    if not args.data_dir:
        raise SwapConfigError("No dataset: pass --data-dir DIR (an ImageFolder root with train/val splits).")
    train_split = resolve_split(args.data_dir, args.train_split)
    check_image_folder(args.data_dir, train_split, "dataset")
    from timm.data.readers.class_map import load_class_map

    class_map = load_class_map(args.class_map) if args.class_map else None
    train_set = image_folder(args.data_dir, train_split, {**ctx.data_config, **train_augmentation(ctx)},
                             class_map=class_map, is_training=True)
    # One step is one update: its batch holds the --grad-accum-steps micro-batches the trainer cuts it into.
    loaders = {"train": resumable_loader(train_set, args.batch_size * args.grad_accum_steps, shuffle=True,
                                         seed=args.seed, rank=ctx.rank, world_size=ctx.world_size,
                                         workers=args.workers, pin_memory=args.pin_mem)}
    val_split = resolve_split(args.data_dir, args.val_split)
    if (Path(args.data_dir) / val_split).is_dir():
        check_image_folder(args.data_dir, val_split, "dataset")
        val_set = image_folder(args.data_dir, val_split, ctx.data_config, class_map=class_map)
        loaders["eval"] = resumable_loader(val_set, args.validation_batch_size or args.batch_size, shuffle=False,
                                           rank=ctx.rank, world_size=ctx.world_size, workers=args.workers,
                                           pin_memory=args.pin_mem)
    return loaders


def train_augmentation(ctx: TrainContext) -> dict[str, Any]:
    """The keyword arguments of timm's ``create_transform`` for training, from timm's augmentation flags."""
    args = ctx.args
    interpolation = args.train_interpolation if args.train_interpolation and not args.no_aug else None
    return dict(no_aug=args.no_aug, train_crop_mode=args.train_crop_mode, scale=tuple(args.scale),
                ratio=tuple(args.ratio), hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                color_jitter_prob=args.color_jitter_prob, grayscale_prob=args.grayscale_prob or 0.0,
                gaussian_blur_prob=args.gaussian_blur_prob or 0.0, auto_augment=args.aa,
                interpolation=interpolation or ctx.data_config["interpolation"], re_prob=args.reprob,
                re_mode=args.remode, re_count=args.recount)


def default_train_steps(ctx: TrainContext) -> Iterator[Step]:
    """``ctx.total_steps`` (timm's epoch count) over ``ctx.loaders['train']``, resuming mid-epoch from
    ``ctx.resume_state``."""
    loader = ctx.loaders["train"]
    steps_per_epoch = len(loader)
    epochs = ctx.total_steps // steps_per_epoch
    start = (ctx.resume_state or {}).get("position", {"epoch": 0, "step_in_epoch": 0, "global_step": 0})
    global_step = start["global_step"]
    for epoch in range(start["epoch"], epochs):
        loader.sampler.set_epoch(epoch)
        first = start["step_in_epoch"] if epoch == start["epoch"] else 0
        loader.sampler.skip(first * loader.batch_size)
        for i, batch in enumerate(loader, start=first):
            new_schedule = (ctx.args.epochs, steps_per_epoch) if global_step == 0 else None
            yield Step(batch=batch, period="train", period_index=0, epoch=epoch, epochs=epochs,
                       step_in_epoch=i, steps_per_epoch=steps_per_epoch, global_step=global_step, lr_epoch=epoch,
                       lr_update=global_step, new_lr_schedule=new_schedule)
            global_step += 1


def default_loss(ctx: TrainContext, step: Step) -> dict[str, Any]:
    """Cross-entropy (label-smoothed with ``--smoothing``) of the train batch."""
    images, labels = step.batch
    logits = ctx.train_model(images.to(ctx.device))
    loss = nn.functional.cross_entropy(logits, labels.to(ctx.device), label_smoothing=ctx.args.smoothing)
    return {"loss": loss}


class Trainer:
    """The loop: steps from the step source, loss from the plugins (or cross-entropy), timm optimizer/schedule."""

    def __init__(self, ctx: TrainContext, pm: Any) -> None:
        self.ctx = ctx
        self.pm = pm
        self.owned = bool(pm.hook.train_steps.get_hookimpls())
        self.lr_schedule: tuple[int, int] | None = None
        self.best: float | None = None
        self.metrics_file = ctx.output_dir / "metrics.jsonl" if ctx.output_dir else None
        self.amp_dtype = getattr(torch, ctx.args.amp_dtype)
        # As timm: a loss scaler for float16 on CUDA only (bfloat16 has float32's range).
        use_scaler = ctx.args.amp and self.amp_dtype == torch.float16 and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def run(self) -> None:
        ctx, pm = self.ctx, self.pm
        steps = pm.hook.train_steps(ctx=ctx) if self.owned else default_train_steps(ctx)
        num_updates = (ctx.resume_state or {}).get("position", {}).get("global_step", 0)
        # disable=None: no bar when stderr is not a terminal (CI logs); log lines still come every --log-interval.
        quiet = not ctx.is_main or ctx.args.no_progress
        bar = tqdm(total=ctx.total_steps, initial=num_updates, disable=True if quiet else None,
                   dynamic_ncols=True, desc="train")
        with StopRequests() as stop, contextlib.closing(bar):
            for step in steps:
                self._step(step, bar)
                signum = stop.received(ctx.device)
                if signum is not None:
                    self._stop(step, signal.Signals(signum))
        pm.hook.on_train_end(ctx=ctx)

    def _step(self, step: Step, bar: tqdm) -> None:
        """One step: its optimizer and schedule changes, the update, its logs, evaluation and save."""
        ctx, pm = self.ctx, self.pm
        if step.reset_optimizer:
            ctx.optimizer = build_optimizer(ctx)
        if step.new_lr_schedule is not None:
            self.lr_schedule = step.new_lr_schedule
        if step.new_lr_schedule is not None or (step.reset_optimizer and self.lr_schedule is not None):
            # A scheduler drives the optimizer it was built on: a fresh optimizer gets the schedule rebuilt on
            # it, which the positioning below continues where it was when the schedule does not restart.
            ctx.lr_scheduler = build_lr_scheduler(ctx, *self.lr_schedule)
        if step.starts_period:
            self._record(_merged(pm.hook.on_period_start(ctx=ctx, step=step)), step.global_step,
                         f"[{step.period} start]")
        if ctx.lr_scheduler is not None:
            # The LR of this update (timm's train.py sets it after the previous update, to the same values);
            # each call is a no-op for the other kind of schedule (per epoch / per update).
            if step.starts_epoch:
                ctx.lr_scheduler.step(step.lr_epoch)
            ctx.lr_scheduler.step_update(num_updates=step.lr_update)
        losses = self._update(step)
        num_updates = step.global_step + 1
        pm.hook.after_step(ctx=ctx, step=step, losses=losses)
        bar.update(1)
        bar.set_postfix(loss=f"{losses['loss']:.3f}", period=step.period, refresh=False)
        if ctx.args.log_interval and num_updates % ctx.args.log_interval == 0:
            # The total as timm logs it; a plugin's other terms under the plugin's own keys.
            terms = {k: v for k, v in losses.items() if k != "loss"}
            ctx.log({"train/loss": losses["loss"], **terms, "lr": self._lr()}, num_updates)
            if ctx.is_main and bar.disable:
                print(f"[{step.period}] step {num_updates}/{ctx.total_steps} loss {losses['loss']:.4f} "
                      f"lr {self._lr():.3g}", flush=True)
        if step.ends_epoch and ctx.distributed and ctx.args.dist_bn in ("broadcast", "reduce"):
            from timm.utils import distribute_bn

            distribute_bn(ctx.model, ctx.world_size, reduce=ctx.args.dist_bn == "reduce")
        validate = not self.owned and step.ends_epoch and (step.epoch + 1) % ctx.args.val_interval == 0
        metrics = self._evaluate(step) if (step.ends_period or validate) else {}
        if self._saves_after(step):
            self.save(step, metrics)

    def _stop(self, step: Step, received: signal.Signals) -> None:
        """Save ``last.pth`` after ``step`` (unless it just was) and stop, saying where ``--resume`` continues."""
        ctx = self.ctx
        if not self._saves_after(step):
            self.save(step, {})
        if ctx.is_main:
            last = ctx.output_dir / "last.pth"
            done, steps = step.epoch * step.steps_per_epoch + step.step_in_epoch + 1, step.epochs * step.steps_per_epoch
            where = f"{step.period} after {done} of its {steps} steps" if done < steps else \
                f"with the period after {step.period}"
            tqdm.write(f"{received.name}: stopped after step {step.global_step + 1} of {ctx.total_steps} and saved "
                       f"{last}; --resume {last} continues {where}.")
        raise SystemExit(128 + received)

    def _saves_after(self, step: Step) -> bool:
        """Whether ``last.pth`` is written after ``step``: at an epoch end and every ``--recovery-interval`` steps."""
        interval = self.ctx.args.recovery_interval
        return step.ends_epoch or bool(interval and (step.global_step + 1) % interval == 0)

    def _lr(self) -> float:
        return float(self.ctx.optimizer.param_groups[0]["lr"])

    def _update(self, step: Step) -> dict[str, float]:
        """One optimizer update: the loss of each micro-batch of the step (``--grad-accum-steps``), back-propagated
        under ``--amp`` autocast, averaged; clipped, then stepped. Returns the averaged loss terms."""
        ctx, args = self.ctx, self.ctx.args
        ctx.train_model.train()
        ctx.optimizer.zero_grad(set_to_none=True)
        chunks = micro_batches(step.batch, args.grad_accum_steps, args.channels_last)
        totals: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            # DDP all-reduces the gradients once per update, at the last micro-batch (as timm's train.py).
            last = i == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not ctx.distributed else ctx.train_model.no_sync()
            with sync:
                with torch.autocast(ctx.device.type, dtype=self.amp_dtype, enabled=args.amp):
                    micro = replace(step, batch=chunk)
                    out = self.pm.hook.compute_loss(ctx=ctx, step=micro) or default_loss(ctx, micro)
                loss = out["loss"] / len(chunks)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + (float(v.detach()) if torch.is_tensor(v) else float(v)) / len(chunks)
        if self.scaler:
            self.scaler.unscale_(ctx.optimizer)
        if args.clip_grad is not None:
            from timm.utils import dispatch_clip_grad

            params = [p for p in ctx.model.parameters() if p.requires_grad]
            dispatch_clip_grad(params, value=args.clip_grad, mode=args.clip_mode)
        if self.scaler:
            self.scaler.step(ctx.optimizer)
            self.scaler.update()
        else:
            ctx.optimizer.step()
        return totals

    def _evaluate(self, step: Step) -> dict[str, float]:
        ctx = self.ctx
        metrics = _merged(self.pm.hook.evaluate(ctx=ctx, step=step))
        if not self.owned and "eval" in ctx.loaders:
            metrics["eval/top1"] = evaluate_top1(ctx.model, ctx.loaders["eval"], ctx.device)
        self._record(metrics, step.global_step + 1, f"[{step.period} epoch {step.epoch}]")
        return metrics

    def _record(self, metrics: dict[str, float], at: int, label: str) -> None:
        """Metrics measured after ``at`` updates to the run's logger (wandb), the console and ``metrics.jsonl``."""
        if not metrics:
            return
        ctx = self.ctx
        ctx.log(metrics, at)
        if ctx.is_main:
            tqdm.write(f"{label} {', '.join(f'{k} {v:.2f}' for k, v in metrics.items())}")
            if self.metrics_file is not None:
                with open(self.metrics_file, "a") as f:
                    f.write(json.dumps({"step": at, **metrics}) + "\n")

    def save(self, step: Step, metrics: dict[str, float]) -> None:
        """Write ``last.pth`` atomically (and ``model_best.pth`` when the eval metric improves)."""
        ctx = self.ctx
        plugin_state: dict[str, Any] = {}
        for result in self.pm.hook.state_dict(ctx=ctx):
            plugin_state.update(result or {})
        if not ctx.is_main:
            return
        checkpoint = {
            "arch": ctx.args.model,
            "model_kwargs": architecture_kwargs(ctx.args),
            "state_dict": ctx.model.state_dict(),
            "optimizer": ctx.optimizer.state_dict(),
            "lr_scheduler": ctx.lr_scheduler.state_dict() if ctx.lr_scheduler is not None else None,
            "lr_schedule": list(self.lr_schedule) if self.lr_schedule else None,
            "amp_scaler": self.scaler.state_dict() if self.scaler else None,
            "position": step.position_after(),
            "plugins": plugin_state,
            "metrics": metrics,
            "args": _plain_args(ctx.args),
        }
        atomic_save(checkpoint, ctx.output_dir / "last.pth")
        value = metrics.get(f"eval/{ctx.args.eval_metric}")
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            atomic_save(checkpoint, ctx.output_dir / "model_best.pth")


def micro_batches(batch: Any, parts: int, channels_last: bool = False) -> list[Any]:
    """``batch`` cut into ``parts`` micro-batches along the first dimension of every tensor in it (tuples, lists
    and dicts of them keep their structure); fewer when a tensor has fewer rows. Image batches (4-D floating
    tensors) become channels-last with ``channels_last``."""
    sizes = [t.shape[0] for t in _tensors(batch)]
    parts = max(1, min([parts, *sizes]))

    def split(obj: Any) -> list[Any]:
        if torch.is_tensor(obj):
            if channels_last and obj.dim() == 4 and obj.is_floating_point():
                obj = obj.contiguous(memory_format=torch.channels_last)
            return list(torch.tensor_split(obj, parts)) if parts > 1 else [obj]
        if isinstance(obj, dict):
            cut = {k: split(v) for k, v in obj.items()}
            return [{k: cut[k][i] for k in obj} for i in range(parts)]
        if isinstance(obj, (list, tuple)):
            cut = [split(v) for v in obj]
            return [type(obj)(c[i] for c in cut) for i in range(parts)]
        return [obj] * parts

    return split(batch)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _merged(results: list[dict[str, float] | None]) -> dict[str, float]:
    """The metrics all plugins returned from one hook."""
    return {k: v for result in results for k, v in (result or {}).items()}


def _plain_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as primitives, so the checkpoint loads with ``weights_only=True``."""
    return json.loads(json.dumps(vars(args), default=str))


def restore(ctx: TrainContext, trainer: Trainer, pm: Any) -> None:
    """Load ``--resume``'s model, optimizer, schedule and plugin state into the freshly built run."""
    state = ctx.resume_state
    if state["arch"] != ctx.args.model:
        raise SwapConfigError(f"--resume {ctx.args.resume} is a {state['arch']} run, not --model {ctx.args.model}.")
    try:
        ctx.model.load_state_dict(state["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointMismatchError(
            f"--resume {ctx.args.resume} does not fit this model (different --model-kwargs, --num-classes or "
            f"plugin settings?): {err}"
        ) from None
    if not ctx.args.no_resume_opt:
        ctx.optimizer.load_state_dict(state["optimizer"])
    if state.get("lr_schedule"):
        trainer.lr_schedule = tuple(state["lr_schedule"])
        ctx.lr_scheduler = build_lr_scheduler(ctx, *trainer.lr_schedule)
        ctx.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if trainer.scaler is not None and state.get("amp_scaler"):
        trainer.scaler.load_state_dict(state["amp_scaler"])
    pm.hook.load_state_dict(ctx=ctx, state=state.get("plugins", {}))


def setup_logging(ctx: TrainContext) -> None:
    """wandb when ``--log-wandb`` is given (set WANDB_MODE=offline to log without a network)."""
    if not (ctx.args.log_wandb and ctx.is_main):
        return
    import wandb

    resume = {"id": ctx.args.wandb_resume_id, "resume": "must"} if ctx.args.wandb_resume_id else {}
    run = wandb.init(project=ctx.args.wandb_project or "timm-swap", name=ctx.output_dir.name,
                     dir=str(ctx.output_dir), config=_plain_args(ctx.args), tags=ctx.args.wandb_tags or None,
                     **resume)
    ctx.log = lambda metrics, step: run.log(metrics, step=step)


def main(argv: Sequence[str] | None = None) -> TrainContext:
    args, pm = parse_args(argv)
    try:
        return run(args, pm)
    except SwapConfigError as err:
        raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace, pm: Any) -> TrainContext:
    """Build the run in the order timm does, with the plugin hooks in between; then train."""
    timm_notes = check_timm_args(args, swap="swap" in args.plugin)
    pm.hook.validate_args(args=args)
    for module in args.device_modules or ():
        importlib.import_module(module)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SwapConfigError(f"--device {args.device}: CUDA is not available here; pass --device cpu.")
    device, rank, world_size = init_distributed(args)
    if rank == 0:
        print("\n".join(timm_notes), flush=True)
    torch.manual_seed(args.seed + rank)
    resolve_lr(args, world_size)
    ctx = TrainContext(args=args, device=device, rank=rank, world_size=world_size)
    if args.resume:
        if not Path(args.resume).is_file():
            raise SwapConfigError(f"--resume {args.resume}: no such checkpoint file.")
        ctx.resume_state = load_checkpoint(args.resume)

    from timm.data import resolve_data_config

    if args.fast_norm:
        from timm.layers import set_fast_norm

        set_fast_norm()
    ctx.model = create_model(args)
    ctx.data_config = resolve_data_config(vars(args), model=ctx.model, verbose=False)
    if args.input_img_mode:
        ctx.data_config["input_img_mode"] = args.input_img_mode
    pm.hook.configure_model(model=ctx.model, ctx=ctx)
    if world_size > 1 and args.sync_bn:
        from timm.layers import convert_sync_batchnorm

        ctx.model = convert_sync_batchnorm(ctx.model)
        args.dist_bn = ""  # synchronised statistics need no averaging at epoch ends (as timm)
    ctx.model.to(device)
    if args.channels_last:
        ctx.model.to(memory_format=torch.channels_last)
    trainer_owned = bool(pm.hook.train_steps.get_hookimpls())
    if not trainer_owned:
        ctx.loaders.update(default_loaders(ctx))
        steps_per_epoch = len(ctx.loaders["train"])
        ctx.total_steps = scheduled_epochs(args, steps_per_epoch) * steps_per_epoch
    for extra in pm.hook.build_loaders(ctx=ctx):
        ctx.loaders.update(extra or {})
    ctx.optimizer = build_optimizer(ctx)
    ctx.train_model = ctx.model
    if world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        ctx.train_model = nn.parallel.DistributedDataParallel(ctx.model, device_ids=ids,
                                                              broadcast_buffers=not args.no_ddp_bb)

    ctx.output_dir = prepare_output_dir(args)
    trainer = Trainer(ctx, pm)
    if ctx.resume_state is not None:
        restore(ctx, trainer, pm)
    if ctx.is_main:
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        with open(ctx.output_dir / "args.yaml", "w") as f:
            yaml.safe_dump(_plain_args(args), f)
    setup_logging(ctx)
    trainer.run()
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return ctx


if __name__ == "__main__":
    main()
