"""``--plugin swap``: knowledge swapping in a timm classifier (forget F, retain R, learn L).

The plugin turns the user's timm run into the reference recipe (../shared/spec/algorithm.md §2, classification
preset): LoRA on the FFN of every block, the pretrained head extended by the new classes and frozen, phases in
the configured order, each step drawing a retain-side batch and a target batch, loss
``w_R·CE(R') + w_L·CE(L) + β·relu(BND − CE(F)) + α·GS``. Forget and retain come from ``--data-dir`` (the
pretrained model's ImageFolder), the learn set from ``--swap-learn-dir``. The swap owns its optimizer and LR
schedule (``--swap-opt`` ...; the preset's AdamW and per-phase cosine by default), stepped per update.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from kswap import (
    PERIODIC_SCORE_IMAGES,
    PRESETS,
    AuditSettings,
    ConfigField,
    GrownRows,
    LabelSpace,
    Order,
    Phase,
    PreparedModel,
    SwapConfig,
    SwapConfigError,
    SwapRound,
    SwapSession,
    adapt_model,
    arg_docs,
    captured_input,
    config_fields,
    config_from_fields,
    distillation_loss,
    earlier_round_sets,
    feature_mmd_loss,
    grow_head,
    imprinted_rows,
    loss_key,
    parent_of,
    score_key,
)
from kswap.audit import few_shot_indices
from kswap.data import drawn_indices

from .audit import audit_classifier
from .context import Step, TrainContext
from .data import (
    check_image_folder,
    class_names,
    concat,
    folder_classes,
    image_folder,
    labelled,
    resolve_split,
    resumable_loader,
    targets,
)
from .evaluation import evaluate_top1
from .hookspecs import hookimpl
from .models import architecture_kwargs, classifier_heads, load_call
from .rounds import previous_round

_logger = logging.getLogger(__name__)

# Images per new class whose mean feature imprints its head row (--swap-head-init imprint): the mean of a few
# dozen is stable, and the pass stays cheap before training on ImageNet-sized learn sets.
IMPRINT_IMAGES = 64

# What the class sets are in this host.
_CLASS_HELP = {"forget": "pretrained classes to forget (folder names of --data-dir, or ids)",
               "retain": "pretrained classes to retain (default: all the others)",
               "learn": "new classes to learn (default: every class folder of --swap-learn-dir)"}


def _dest(field: ConfigField) -> str:
    return field.flag[2:].replace("-", "_")


def add_config_arguments(group: argparse._ArgumentGroup) -> None:
    """One flag per ``SwapConfig`` setting (``kswap.config_fields``); unset flags keep the ``--swap-task`` preset."""
    preset = SwapConfig.preset("classification", forget=("_",), learn=("_",))
    for f in config_fields():
        if f.kind == "classes":
            group.add_argument(f.flag, nargs="+", default=None, metavar="CLASS", help=_CLASS_HELP[f.path[0]])
            continue
        default = f.get(preset)
        default = default.value if isinstance(default, Order) else default
        kwargs: dict[str, Any] = {"default": None, "help": f"{f.help} (classification preset: {default})"}
        if f.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.kind == "order":
            kwargs["choices"] = [o.value for o in Order]
        elif f.kind == "length":
            kwargs["metavar"] = "LEN"
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[f.kind]
        group.add_argument(f.flag, **kwargs)


# The swap's optimizer and LR schedule: --swap-* flag -> the timm flag it sets. The defaults are the reference
# classification preset (../shared/spec/algorithm.md §2.5), not the pretraining run's --opt/--lr/... flags.
_OPTIM_FLAGS = {"swap_opt": "opt", "swap_lr": "lr", "swap_weight_decay": "weight_decay", "swap_sched": "sched",
                "swap_warmup_epochs": "warmup_epochs", "swap_min_lr": "min_lr"}


def swap_config_from_args(args: argparse.Namespace) -> SwapConfig:
    """The ``SwapConfig`` of the ``--swap-*`` flags over the ``--swap-task`` preset; unset flags keep the preset."""
    if args.swap_task not in PRESETS:
        raise SwapConfigError(f"Unknown --swap-task {args.swap_task!r}; choose one of: {', '.join(PRESETS)}.")
    values = {f: getattr(args, _dest(f)) for f in config_fields()}
    return config_from_fields(args.swap_task, {f: tuple(v) if f.kind == "classes" else v
                                               for f, v in values.items() if v is not None})


class SwapPlugin:
    """The ``swap`` plugin of ``timm_swap.train``."""

    def __init__(self) -> None:
        self.config: SwapConfig | None = None
        self.space: LabelSpace | None = None
        self.sets: dict[str, tuple[int, ...]] = {}
        # The classes of --data-dir (the first round's pretrained classes) and, swapping a swapped model again, the
        # rounds it went through.
        self.base: list[str] = []
        self.history: list[SwapRound] = []
        self.prepared: PreparedModel | None = None
        self.train_sets: dict[str, Any] = {}
        self.eval_loaders: dict[str, Any] = {}
        # Periodic scores (--swap-eval-interval) read a seeded subsample of each set (--swap-eval-images).
        self.periodic_loaders: dict[str, Any] = {}
        self.session: SwapSession | None = None
        self._ctx: TrainContext | None = None

    # -- arguments and validation ------------------------------------------------------------------------------
    @hookimpl
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Knowledge swap (--plugin swap)")
        add_config_arguments(g)
        g.add_argument("--swap-task", default="classification", help="preset of reference defaults")
        g.add_argument("--swap-learn-dir", default=None, metavar="DIR",
                       help="ImageFolder root (same split names) with the new classes")
        g.add_argument("--swap-head-init", default="xavier_uniform", choices=("xavier_uniform", "zeros", "imprint"),
                       help="new class rows: xavier (reference), zeros, or imprinted from the learn images' mean "
                            "pre-logit features, scaled to the old rows' norm (bias: the old rows' mean)")
        g.add_argument("--swap-train-fraction", type=float, default=1.0,
                       help="random fraction of the forget/retain train images used (reference: 0.1)")
        g.add_argument("--swap-eval-interval", type=int, default=0, metavar="N",
                       help="also evaluate the three sets every N steps (0: at phase ends only)")
        g.add_argument("--swap-eval-images", type=int, default=PERIODIC_SCORE_IMAGES, metavar="N",
                       help="the scores every --swap-eval-interval steps read a seeded subsample of at most N test "
                            "images per set (before the swap and at phase ends: the whole sets)")
        g.add_argument("--swap-audit", action="store_true",
                       help="after the swap, audit the forgetting: linear probes on the pre-logits, a relearn attack "
                            "and the neighbour-class mass, for the pretrained and the swapped model (in the report)")
        docs = arg_docs(AuditSettings)
        for f in fields(AuditSettings):
            if f.name != "seed":  # the run's --seed
                g.add_argument(f"--swap-audit-{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                               help=docs[f.name])
        g.add_argument("--swap-opt", default="adamw", help="the swap's optimizer (timm name); replaces --opt")
        g.add_argument("--swap-lr", type=float, default=1e-2, help="the swap's learning rate; replaces --lr")
        g.add_argument("--swap-weight-decay", type=float, default=0.05, help="replaces --weight-decay")
        g.add_argument("--swap-sched", default="cosine", help="the swap's LR schedule (timm name); replaces --sched")
        g.add_argument("--swap-warmup-epochs", type=int, default=0, help="replaces --warmup-epochs")
        g.add_argument("--swap-min-lr", type=float, default=1e-5, help="replaces --min-lr")

    @hookimpl
    def validate_args(self, args: argparse.Namespace) -> None:
        if not args.swap_forget:
            raise SwapConfigError("--plugin swap needs --swap-forget CLASS [CLASS ...].")
        if not args.swap_learn_dir:
            raise SwapConfigError("--plugin swap needs --swap-learn-dir DIR (an ImageFolder of the new classes).")
        if not (args.initial_checkpoint or args.pretrained or args.resume):
            raise SwapConfigError("--plugin swap edits a trained model: pass --initial-checkpoint or --pretrained.")
        if not args.data_dir:
            raise SwapConfigError("--plugin swap needs --data-dir, the ImageFolder the model was trained on.")
        if args.swap_eval_images < 1:
            raise SwapConfigError(f"--swap-eval-images must be >= 1, got {args.swap_eval_images}.")
        if not 0 < args.swap_train_fraction <= 1:
            raise SwapConfigError(f"--swap-train-fraction must be in (0, 1], got {args.swap_train_fraction}.")
        if args.swap_sched == "plateau":
            raise SwapConfigError("--swap-sched plateau needs an epoch metric, but the swap steps its LR schedule per "
                                  "update: choose cosine, tanh, step, multistep or poly.")
        for root, what in ((args.data_dir, "--data-dir dataset"), (args.swap_learn_dir, "--swap-learn-dir dataset")):
            for split in (args.train_split, args.val_split):
                check_image_folder(root, resolve_split(root, split), what)
        # Class ids in timm's ImageFolder order, the order the pretrained head was trained in.
        self.base = folder_classes(args.data_dir, resolve_split(args.data_dir, args.train_split))
        learn_root = Path(args.swap_learn_dir) / resolve_split(args.swap_learn_dir, args.train_split)
        available = folder_classes(args.swap_learn_dir, resolve_split(args.swap_learn_dir, args.train_split))
        # A swap's model_swapped.pth as the checkpoint: the next round, over the classes it has.
        previous = previous_round(args.initial_checkpoint, self.base, available, learn_root)
        classes = previous.classes if previous else tuple(self.base)
        self.history = previous.rounds if previous else []
        # By default every class folder is new, but those earlier rounds learned.
        args.swap_learn = args.swap_learn or [c for c in available if c not in classes[len(self.base):]]
        missing = [c for c in args.swap_learn if c not in available]
        if missing:
            raise SwapConfigError(f"--swap-learn names {missing}, which are not class folders of {learn_root} "
                                  f"({available}).")
        self.config = swap_config_from_args(args)
        self.space = LabelSpace.for_config(classes, self.config, self.history)
        self.sets = self.space.resolve(self.config).as_dict()  # classes forgotten earlier are in none of them
        # The first round's classes from --data-dir are the yaml's --num-classes: a next round takes the head's.
        if args.num_classes not in (None, self.space.num_pretrained) and not (previous and args.num_classes ==
                                                                             len(self.base)):
            where = f"--initial-checkpoint {args.initial_checkpoint}" if previous else "--data-dir"
            raise SwapConfigError(
                f"--num-classes {args.num_classes} is the size of the pretrained head, but {where} has "
                f"{self.space.num_pretrained} classes. Pass --num-classes {self.space.num_pretrained} (or leave it "
                f"out); the plugin extends the head to {self.space.num_classes} itself."
            )
        args.num_classes = self.space.num_pretrained
        # The swap's optimizer and schedule replace the pretraining flags; stepped per update, so that a phase
        # measured in steps gets its whole schedule (the epoch of such a phase is the phase).
        for swap_flag, flag in _OPTIM_FLAGS.items():
            setattr(args, flag, getattr(args, swap_flag))
        args.sched_on_updates = True

    # -- model and data ------------------------------------------------------------------------------------------
    @hookimpl
    def configure_model(self, model: nn.Module, ctx: TrainContext) -> None:
        # Every head grows (a distilled DeiT averages two): a head left out would not name the new classes.
        heads = classifier_heads(model)
        for head_name, head in heads.items():
            if not isinstance(head, nn.Linear):
                raise SwapConfigError(f"{ctx.args.model}'s classifier {head_name} is not a Linear layer.")
        features = self._learn_features(model, ctx) if ctx.args.swap_head_init == "imprint" else None
        grown: dict[str, GrownRows] = {}
        for head_name, head in heads.items():
            if features is not None:
                rows = dict(new_weight=imprinted_rows(head.weight, features),
                            bias=float(head.bias.detach().mean()) if head.bias is not None else 0.0)
            else:
                rows = dict(init=ctx.args.swap_head_init)
            grown |= grow_head(model, head_name, self.space.num_pretrained, len(self.space.new), **rows)
        self.prepared = adapt_model(model, self.config, grown)
        if ctx.is_main:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tqdm.write(f"swap: LoRA in {len(self.prepared.groups)} groups, {n} trainable parameters; "
                       f"{', '.join(heads)} {self.space.num_pretrained} -> {self.space.num_classes} classes (frozen)")

    @torch.no_grad()
    def _learn_features(self, model: nn.Module, ctx: TrainContext) -> torch.Tensor:
        """Per new class, the mean pre-logit feature of (up to ``IMPRINT_IMAGES`` of) its train images."""
        args = ctx.args
        dataset = image_folder(args.swap_learn_dir, resolve_split(args.swap_learn_dir, args.train_split),
                               ctx.data_config, class_map={name: i for i, name in enumerate(self.space.new)})
        keep = few_shot_indices(targets(dataset), range(len(self.space.new)), IMPRINT_IMAGES, args.seed)
        was_training = model.training
        model.eval()
        feats, ys = zip(*((model.forward_head(model.forward_features(x), pre_logits=True).float(), y)
                          for x, y in DataLoader(Subset(dataset, keep), batch_size=args.batch_size)), strict=True)
        model.train(was_training)
        feats, ys = torch.cat(feats), torch.cat(ys)
        return torch.stack([feats[ys == c].mean(0) for c in range(len(self.space.new))])

    @hookimpl
    def build_loaders(self, ctx: TrainContext) -> dict[str, Any]:
        args = ctx.args
        # The learn folders hold the new classes and those earlier rounds learned (the model's classes after the base).
        learn_map = {name: self.space.id_of(name) for name in (*self.space.pretrained[len(self.base):],
                                                                *self.space.new)}
        splits = {"train": args.train_split, "eval": args.val_split}
        for kind, split in splits.items():
            old = image_folder(args.data_dir, resolve_split(args.data_dir, split), ctx.data_config)
            if class_names(old) != self.base:
                raise SwapConfigError(f"The {split} split of --data-dir has classes {class_names(old)}, "
                                      f"not the train split's {self.base}.")
            new = image_folder(args.swap_learn_dir, resolve_split(args.swap_learn_dir, split), ctx.data_config,
                               class_map=learn_map)
            # The reference's random fraction of the pretrained sets; the learn set whole.
            fraction = args.swap_train_fraction if kind == "train" else 1.0
            sets = {name: labelled(ids, (old, new), 1.0 if name == "learn" else fraction, args.seed)
                    for name, ids in self.sets.items()}
            for name, dataset in sets.items():
                if len(dataset) == 0:
                    raise SwapConfigError(f"The {name} set has no images in the {split} split.")
            if kind == "train":
                self.train_sets = sets
            else:
                def loader(dataset: Any) -> DataLoader:
                    return resumable_loader(dataset, args.validation_batch_size or args.batch_size, shuffle=False,
                                            rank=ctx.rank, world_size=ctx.world_size, workers=args.workers,
                                            pin_memory=args.pin_mem)

                earlier = self._earlier_sets()
                scored = {**sets, **{name: labelled(ids, (old, new)) for name, ids in earlier.items()}}
                if self.history:  # retain scores the base classes kept; those learned earlier score by round
                    learned = {i for name, ids in earlier.items() if name.startswith("learn") for i in ids}
                    scored["retain"] = labelled([i for i in self.sets["retain"] if i not in learned], (old, new))
                self.eval_loaders = {name: loader(d) for name, d in scored.items() if len(d)}
                self.periodic_loaders = {
                    name: loader(Subset(d, drawn_indices(len(d), args.swap_eval_images, args.seed)))
                    for name, d in scored.items() if len(d)}
        self._ctx = ctx
        self.session = SwapSession(self.config, self, self.prepared, metric="top1", log=self._log,
                                   classes={s: [self.space.names[i] for i in ids] for s, ids in self.sets.items()},
                                   history=self.history,
                                   parent=parent_of(args.initial_checkpoint))
        ctx.total_steps = self.session.scheduler.total_steps
        if ctx.is_main:
            span = "restarted per phase" if self.config.restart_lr_schedule else "over all phases"
            tqdm.write(f"swap: optimizer {args.opt} (lr {args.lr:g}, weight decay {args.weight_decay:g}), "
                       f"{args.sched} LR schedule {span} stepped per update, {args.warmup_epochs} warmup epochs, "
                       f"min lr {args.min_lr:g}; set by --swap-opt/--swap-lr/--swap-weight-decay/--swap-sched/"
                       "--swap-warmup-epochs/--swap-min-lr (the run's --opt/--lr/... are not used)")
        return {score_key(name): loader for name, loader in self.eval_loaders.items()}

    def _earlier_sets(self) -> dict[str, tuple[int, ...]]:
        """Earlier rounds' forget and learn sets (``forget_r1``, ``learn_r1``, ...) as label ids, scored by round."""
        return {name: tuple(self.space.id_of(c) for c in names)
                for name, names in earlier_round_sets(self.history).items()}

    # -- the session's host (kswap.SwapHost): the loaders and phase starts; the script runs the steps -----------
    def role_loader(self, phase: Phase, role: str, sets: tuple[str, ...]) -> DataLoader:
        """A loader over the concatenation of ``role``'s sets. A step is one update: its batches hold the
        ``--grad-accum-steps`` micro-batches the trainer cuts them into."""
        args, ctx = self._ctx.args, self._ctx
        return resumable_loader(
            concat([self.train_sets[s] for s in sets]), args.batch_size * args.grad_accum_steps, shuffle=True,
            seed=args.seed + 1000 * phase.index + list(phase.sources).index(role), rank=ctx.rank,
            world_size=ctx.world_size, workers=args.workers, pin_memory=args.pin_mem)

    def score(self, subsample: bool = False) -> tuple[dict[str, float], dict[str, int]]:
        """Per-set top-1 of the whole test sets, or of their subsamples; and the images each score read."""
        ctx = self._ctx
        loaders = self.periodic_loaders if subsample else self.eval_loaders
        return ({name: evaluate_top1(ctx.model, loader, ctx.device) for name, loader in loaders.items()},
                {name: len(loader.dataset) for name, loader in loaders.items()})

    def _log(self, level: int, message: str) -> None:
        """The session's lines on the main process's console, its warnings as log records."""
        if level >= logging.WARNING:
            _logger.warning(message)
        elif self._ctx.is_main:
            tqdm.write(f"swap: {message}")

    def start_phase(self, phase: Phase) -> None:
        # The optimizer reset and LR schedule of a phase start ride on its first Step (train_steps).
        if self._ctx.is_main:
            tqdm.write(f"swap: phase {phase.name} ({self.session.scheduler.phase_steps[phase.index]} steps)")

    # -- the steps and the loss ----------------------------------------------------------------------------------
    @hookimpl
    def train_steps(self, ctx: TrainContext) -> Iterator[Step]:
        sched, cfg = self.session.scheduler, self.config
        epochs = [(n // self._steps_per_epoch(p)) for p, n in zip(sched.phases, sched.phase_steps, strict=True)]
        # One schedule over all phases (no restart) spans every step: sum(epochs) epochs of the mean epoch length.
        whole_run = (sum(epochs), round(sched.total_steps / sum(epochs)))
        while not sched.done:
            phase = sched.phase
            spe = self._steps_per_epoch(phase)
            step_in_phase = sched.step_in_phase
            new_schedule = None
            if step_in_phase == 0 and (cfg.restart_lr_schedule or phase.index == 0):
                new_schedule = (epochs[phase.index], spe) if cfg.restart_lr_schedule else whole_run
            lr_epoch = step_in_phase // spe + (0 if cfg.restart_lr_schedule else sum(epochs[: phase.index]))
            batch = self.session.next_batches()
            step = Step(
                batch=batch, period=phase.name, period_index=phase.index, epoch=step_in_phase // spe,
                epochs=epochs[phase.index], step_in_epoch=step_in_phase % spe, steps_per_epoch=spe,
                global_step=sched.global_step, lr_epoch=lr_epoch,
                lr_update=step_in_phase if cfg.restart_lr_schedule else sched.global_step,
                new_lr_schedule=new_schedule,
                reset_optimizer=step_in_phase == 0 and phase.index > 0 and cfg.reset_optimizer_between_phases,
            )
            # Count the step before handing it out: a checkpoint written during it resumes after it.
            self.session.count_step()
            yield step

    def _steps_per_epoch(self, phase: Phase) -> int:
        n = len(self.session.loaders[phase.index]["retain"].loader)
        return n if phase.length.epochs is not None else self.session.scheduler.phase_steps[phase.index]

    @hookimpl
    def compute_loss(self, ctx: TrainContext, step: Step) -> dict[str, Any]:
        phase = self.session.phases[step.period_index]
        roles = list(step.batch)
        sizes = [len(step.batch[r][1]) for r in roles]
        images = torch.cat([step.batch[r][0] for r in roles]).to(ctx.device)
        teacher = self.session.teacher(phase)
        if teacher is not None:  # the phase-start model's logits for the retain-side images
            with teacher.active(ctx.model) as model:
                teacher_logits = model(step.batch["retain"][0].to(ctx.device))
        # One forward over all roles' images: DDP sees each parameter used once before the backward.
        # The first head's input: a distilled DeiT's second head reads the distillation token, not the features.
        with captured_input(next(iter(classifier_heads(ctx.model).values()))) as head_input:
            logits = dict(zip(roles, ctx.train_model(images).split(sizes), strict=True))
        task = {r: F.cross_entropy(logits[r], step.batch[r][1].to(ctx.device)) for r in roles}
        distill = distillation_loss(logits["retain"], teacher_logits) if teacher is not None else None
        mmd = None
        if "forget" in roles and self.session.weights(phase).feature_mmd:
            features = dict(zip(roles, head_input[0].split(sizes), strict=True))
            mmd = feature_mmd_loss(features["forget"], features["retain"])
        out = self.session.phase_loss(task, distill, phase, feature_mmd=mmd)
        return {"loss": out.total, **{loss_key(k): v for k, v in out.terms.items() if k != "total"}}

    # -- evaluation and report -----------------------------------------------------------------------------------
    @hookimpl
    def on_period_start(self, ctx: TrainContext, step: Step) -> dict[str, float] | None:
        scores = self.session.score_before() if step.global_step == 0 else None  # None when resumed
        return None if scores is None else {score_key(k): v for k, v in scores.items()}

    @hookimpl
    def after_step(self, ctx: TrainContext, step: Step, losses: dict[str, float]) -> None:
        phase = self.session.phases[step.period_index]
        if self.session.awaits_forget_loss(phase):
            self.session.observe_forget_loss(losses[loss_key("forget/task")], phase)
        interval = ctx.args.swap_eval_interval
        if interval and (step.global_step + 1) % interval == 0 and not step.ends_period:
            scores = self.session.score_during(phase, step.global_step + 1)
            ctx.log({score_key(k): v for k, v in scores.items()}, step.global_step + 1)

    @hookimpl
    def evaluate(self, ctx: TrainContext, step: Step) -> dict[str, float]:
        scores = self.session.score_phase_end(self.session.phases[step.period_index], step.global_step + 1)
        return {score_key(k): v for k, v in scores.items()}

    @hookimpl
    def state_dict(self, ctx: TrainContext) -> dict[str, Any]:
        return {"swap": self.session.state_dict()}  # the report's run time ticked: a resume goes on adding

    @hookimpl
    def load_state_dict(self, ctx: TrainContext, state: dict[str, Any]) -> None:
        saved = state.get("swap")
        if saved is None:
            raise SwapConfigError(f"--resume {ctx.args.resume} is not a swap run (no swap state in it).")
        self.session.load_state_dict(saved)

    @hookimpl
    def on_train_end(self, ctx: TrainContext) -> None:
        if not ctx.is_main:
            return
        if ctx.args.swap_audit:
            self.session.report.audit = self._audit(ctx)
        kwargs = architecture_kwargs(ctx.args)
        paths = self.session.export(ctx.output_dir, class_names=list(self.space.names),
                                    num_classes=self.space.num_classes, arch=ctx.args.model, model_kwargs=kwargs)
        (ctx.output_dir / "class_names.json").write_text(json.dumps(list(self.space.names), indent=1))
        tqdm.write("\n" + self.session.report.to_markdown())
        tqdm.write(f"swap: report {paths['md']}; load the merged model with "
                   f"{load_call(ctx.args.model, self.space.num_classes, paths['model'], kwargs)}")

    def _audit(self, ctx: TrainContext) -> dict[str, Any]:
        args = ctx.args
        settings = AuditSettings(**{f.name: getattr(args, f"swap_audit_{f.name}") for f in fields(AuditSettings)
                                    if f.name != "seed"}, seed=args.seed)
        tqdm.write(f"swap: auditing the forgetting ({settings})")
        sets = {"train": self.train_sets, "test": {name: loader.dataset for name, loader in self.eval_loaders.items()}}
        return audit_classifier(ctx.model, self.prepared.grown, sets, self.sets["forget"], settings, ctx.device,
                                args.validation_batch_size or args.batch_size)
