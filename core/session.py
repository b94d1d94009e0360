"""The swap protocol in one place: a session that drives phases, role loaders, losses, scoring and the report,
behind a small host protocol.

A host (timm's training script, mmengine's loop, detectron2's trainer, or your own loop) prepares the model
with ``prepare_model`` and implements ``SwapHost``: a loader for a phase's role, the task losses of role-tagged
batches, per-set scores, the phase start (optimizer / LR schedule) and saving. The session owns the rest:

    session = SwapSession(config, host, prepared)
    session.run(optimizer_step)          # or, in a host's own loop: session.begin(); loss = session.loss();
                                         # ... backward, step ...; session.step_done()
    session.export(out_dir)              # swap_report.{json,md,png}, model_swapped.pth, swap_adapter.safetensors
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .adapter import SwapRound
from .config import LossWeights, SwapConfig
from .data import InfiniteLoader
from .errors import SwapConfigError
from .export import score_key, write_adapter, write_merged_model
from .heads import (
    GrownRows,
    check_checkpoint_rows,
    check_head_size,
    extend_head,
    grow_checkpoint_rows,
    hidden_new_classes,
    replace_module,
)
from .lora import LoraSnapshot, freeze_all_but_lora_, inject_lora, lora_groups, validate_lora_state
from .losses import PhaseLoss, PhaseLossOutput, TaskLoss, default_loss_key, group_sparse_loss
from .metrics import SETS
from .phases import Phase, PhaseScheduler, plan_phases
from .report import SwapReport

logger = logging.getLogger(__name__)

# The default subsample of each set for scores between phase ends: they are a curve to watch, not the result; a few
# hundred images per set show its trend at a fraction of a whole-set pass.
PERIODIC_SCORE_IMAGES = 200

# What ``SwapHost.score`` returns: the per-set scores, or they and the images each read.
Scored = Mapping[str, float] | tuple[Mapping[str, float] | None, Mapping[str, int]]


class SwapHost(Protocol):
    """What a host framework gives a ``SwapSession``."""

    def role_loader(self, phase: Phase, role: str, sets: tuple[str, ...]) -> Iterable[Any]:
        """A finite loader over the training images of ``sets`` (``forget``, ``retain``, ``learn``) for ``role``
        of ``phase``; the session cycles it. A loader whose sampler has ``set_epoch``/``skip`` (e.g.
        ``ResumableSampler``) resumes mid-epoch exactly."""

    def task_losses(self, batches: Mapping[str, Any]) -> Mapping[str, TaskLoss]:
        """Forward one batch per role (model in training mode) and return per role its task loss (a tensor or
        the host's loss dict)."""

    def score(self, subsample: bool = False) -> Scored:
        """Per-set scores (``forget``, ``retain``, ``learn``) of the current model, in percent: of the whole test
        sets, or of a seeded subsample of each when ``subsample`` (the scores between phase ends). Either the
        scores, or ``(scores, images)`` with the number of images each set's score read (the report says it); the
        scores may be ``None`` on a process that does not hold them (a DDP rank other than the main one)."""

    def start_phase(self, phase: Phase) -> None:
        """Called before the first step of each phase: rebuild the optimizer or restart the LR schedule where
        the config says so (``reset_optimizer_between_phases``, ``restart_lr_schedule``)."""

    def save(self, state: dict[str, Any], tag: str) -> None:
        """Save a resumable checkpoint holding ``state`` (the session's ``state_dict``) at a phase end."""


@dataclass
class PreparedModel:
    """A model made ready for a swap by ``prepare_model``: its head grown and LoRA injected."""

    model: nn.Module
    grown: dict[str, GrownRows]
    groups: dict[str, list[torch.Tensor]]
    adapted: list[str]


def grow_head(model: nn.Module, head: str, num_pretrained: int, num_new: int, *, trailing_rows: int = 0,
              **head_kwargs: Any) -> dict[str, GrownRows]:
    """Check one classifier of ``model`` and grow it (in place) by the new classes; returns how its keys grew.

    Args:
        model: the pretrained model.
        head: the dotted name of the classifier (an ``nn.Linear`` or 1x1 ``nn.Conv2d``).
        num_pretrained: the pretrained classes, which the head must have (plus ``trailing_rows``).
        num_new: the new classes.
        trailing_rows: rows kept last, such as Mask2Former's "no object".
        head_kwargs: passed to ``extend_head`` (``init``, ``bias``, ``new_weight``).
    """
    old = model.get_submodule(head)
    rows = old.weight.shape[0]
    check_head_size(rows, num_pretrained, trailing_rows, where=f"classifier {head}")
    replace_module(model, head, extend_head(old, num_new, trailing_rows=trailing_rows, **head_kwargs))
    grow = GrownRows(rows, rows + num_new, trailing_rows)
    return {f"{head}.{p}": grow for p in ("weight", "bias") if getattr(old, p, None) is not None}


def prepare_model(model: nn.Module, config: SwapConfig, head: str, num_pretrained: int, num_new: int, *,
                  trailing_rows: int = 0, **head_kwargs: Any) -> PreparedModel:
    """Check the head, grow it by the new classes, inject LoRA, freeze everything else, find the groups.

    A model with several classifiers (a distilled DeiT's two heads) grows each with ``grow_head``, then
    ``adapt_model``. The arguments are ``grow_head``'s, with ``config`` the swap config (LoRA settings).
    """
    grown = grow_head(model, head, num_pretrained, num_new, trailing_rows=trailing_rows, **head_kwargs)
    return adapt_model(model, config, grown)


def adapt_model(model: nn.Module, config: SwapConfig, grown: dict[str, GrownRows]) -> PreparedModel:
    """Inject LoRA, freeze everything else and find the groups: ``prepare_model`` after a host grew its heads
    itself (DINO's per-layer class branches, Mask2Former's class weights), ``grown`` saying how."""
    adapted = inject_lora(model, config.lora)
    freeze_all_but_lora_(model)
    return PreparedModel(model, grown, lora_groups(model, config.lora.group_by), adapted)


def adapt_checkpoint(state: Mapping[str, torch.Tensor], model: nn.Module, grown: Mapping[str, GrownRows],
                     hint: str = "", grown_ok: bool = True) -> dict[str, torch.Tensor]:
    """A pretrained (or resumed) checkpoint's state dict for a prepared model: a DDP wrapper's ``module.`` prefix
    stripped, the class rows grown as the heads were, mapped to the LoRA-injected keys and checked to fit.

    Args:
        hint: how the host's user points at the right checkpoint, for the error on class rows of another size.
        grown_ok: accept class rows already grown (a resume); ``False`` for a checkpoint that must be pretrained.

    Raises:
        CheckpointMismatchError: class rows of another label space; a key other than LoRA's missing, unexpected
            or of another shape.
    """
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    check_checkpoint_rows(plain, grown, hint, grown_ok)
    grow_checkpoint_rows(plain, model.state_dict(), dict(grown))
    return validate_lora_state(model, plain)


@dataclass
class SwapSession:
    """Drives one swap: phases, one cycling loader per phase and role, the phase loss with its forget-bound
    check, the distillation teacher, scoring before / every ``eval_interval`` steps / at phase ends, the report,
    resume state and export.

    A host without a loop of its own calls ``run``; a host with one (timm's script, mmengine's loop, a detectron2
    hook) uses the pieces ``run`` is made of: ``next_batches``, ``weights`` / ``phase_loss``, ``teacher``,
    ``observe_forget_loss``, ``begin`` and ``step_done`` (or, where the host decides when to score, their parts
    ``count_step``, ``score_before`` / ``score_during`` / ``score_phase_end``), the ``report`` (its ``tick`` adds the
    run's wall time), ``state_dict`` / ``load_state_dict`` and ``export``.

    Args:
        config: the swap config.
        host: the host framework's side (``SwapHost``).
        prepared: the model from ``prepare_model`` (or the host's own surgery with the same fields).
        classes: per set, class names for the report.
        metric: the per-set score's name (``top1``, ``bbox_mAP``, ``mIoU``).
        eval_interval: score the sets every this many steps as well (0: phase ends only).
        is_loss: selects the optimised terms of a host loss dict.
        log: ``log(level, message)`` puts the session's progress lines and warnings in the host's log (default:
            this module's logger, prefixed ``swap:``).
        history: the rounds the model was swapped in before (``kswap.rounds_of`` its checkpoint); this swap is the
            next round.
        parent: ``kswap.file_sha256`` of the checkpoint the swap starts from (``""`` when none).
    """

    config: SwapConfig
    host: SwapHost
    prepared: PreparedModel
    classes: Mapping[str, list[str]] = field(default_factory=dict)
    metric: str = "top1"
    eval_interval: int = 0
    is_loss: Callable[[str], bool] = default_loss_key
    log: Callable[[int, str], None] | None = None
    history: Sequence[SwapRound] = ()
    parent: str = ""

    def __post_init__(self) -> None:
        self.phases = plan_phases(self.config)
        self.loaders = [
            {role: InfiniteLoader(self.host.role_loader(p, role, sets)) for role, sets in p.sources.items()}
            for p in self.phases
        ]
        self.scheduler = PhaseScheduler(self.phases, lambda p: len(self.loaders[p.index]["retain"].loader),
                                        fingerprint=self.config.fingerprint())
        self.report = SwapReport(order=self.config.order.value, metric=self.metric, classes=dict(self.classes),
                                 rounds=[r.to_dict() for r in self.rounds])
        self._log = self.log or (lambda level, message: logger.log(level, f"swap: {message}"))
        # The LoRA weights as the current phase started, when its loss distils towards that model.
        self._teacher: tuple[int, LoraSnapshot] | None = None
        self._started: int | None = None  # the phase whose start the host was last told

    @property
    def rounds(self) -> list[SwapRound]:
        """The model's rounds, this swap last."""
        this = SwapRound(len(self.history) + 1, tuple(map(str, self.classes.get("forget", ()))),
                         tuple(map(str, self.classes.get("learn", ()))), self.parent)
        return [*self.history, this]

    @property
    def done(self) -> bool:
        return self.scheduler.done

    @property
    def phase(self) -> Phase:
        return self.scheduler.phase

    # -- the pieces of a step ------------------------------------------------------------------------------------
    def start_phase(self) -> None:
        """``host.start_phase`` at a phase's first step, once: ``next_batches`` calls it, a host whose hooks run
        before the batch is drawn (detectron2's ``before_step``) may call it there."""
        if self.scheduler.at_phase_start and self._started != self.phase.index:
            self._started = self.phase.index
            self.host.start_phase(self.phase)

    def next_batches(self) -> dict[str, Any]:
        """One batch per loss role of the current phase (``start_phase`` first)."""
        self.start_phase()
        return {role: next(it) for role, it in self.loaders[self.phase.index].items()}

    # ``phase`` (default: the current one) serves hosts that count a step before running it.
    def weights(self, phase: Phase | None = None) -> LossWeights:
        """A phase's loss weights, a relative forget bound resolved once measured."""
        phase = phase or self.phase
        return self.report.phase_weights(phase.name, phase.loss)

    def phase_loss(self, task: Mapping[str, TaskLoss], distill: torch.Tensor | None = None,
                   phase: Phase | None = None, feature_mmd: torch.Tensor | None = None) -> PhaseLossOutput:
        """A phase's loss of per-role task losses, the LoRA groups' sparsity, a distillation and a feature term."""
        return PhaseLoss(self.weights(phase), self.is_loss)(task, gs=group_sparse_loss(self.prepared.groups),
                                                            distill=distill, feature_mmd=feature_mmd)

    def teacher(self, phase: Phase | None = None) -> LoraSnapshot | None:
        """The model as a phase started (its LoRA weights), when the phase's loss distils towards it; taken at
        the phase's first call and kept in the resume state."""
        phase = phase or self.phase
        if not self.weights(phase).distill:
            return None
        if self._teacher is None or self._teacher[0] != phase.index:
            self._teacher = (phase.index, LoraSnapshot(self.prepared.model))
        return self._teacher[1]

    def awaits_forget_loss(self, phase: Phase | None = None) -> bool:
        """Whether a phase has a forget role whose first task loss is not yet recorded (``observe_forget_loss``)."""
        phase = phase or self.phase
        return "forget" in phase.sources and phase.name not in self.report.forget_bounds

    def observe_forget_loss(self, forget_loss: float | torch.Tensor, phase: Phase | None = None) -> None:
        """Record the forget-set task loss of a forget phase's first step against the bound: it resolves a relative
        bound, and an inactive bound is warned about. Under DDP every rank calls it with its own batch's loss and
        the mean over the ranks is recorded, so that every rank resolves the same bound."""
        phase = phase or self.phase
        if not self.awaits_forget_loss(phase):
            return
        warning = self.report.start_forget_phase(phase.name, phase.loss, mean_over_ranks(forget_loss))
        if warning:
            self._log(logging.WARNING, warning)

    def count_step(self) -> bool:
        """Count one optimizer step; ``True`` when it ended its phase."""
        return self.scheduler.step()

    # -- scoring: before, between phase ends, at phase ends ---------------------------------------------------------
    def score_before(self) -> dict[str, float] | None:
        """Score the pretrained model (new classes hidden, LoRA still zero) as "before", unless a resumed run
        already has it; returns the scores when it scored (``None`` off the process holding them)."""
        if self.report.before is not None:
            return None
        with hidden_new_classes(self.prepared.model, self.prepared.grown):
            scores, images = self._scored(subsample=False)
        if scores is not None:
            self.report.set_before(scores, images)
            self._log(logging.INFO, f"before {_fmt(scores)}")
        return scores

    def score_during(self, phase: Phase, step: int) -> dict[str, float] | None:
        """Score each set's subsample at ``step`` of ``phase`` (a point of the curve)."""
        scores, images = self._scored(subsample=True)
        if scores is not None:
            self.report.record(step, phase.name, scores, images, subsample=self._is_subsample(images))
        return scores

    def score_phase_end(self, phase: Phase, step: int) -> dict[str, float] | None:
        """Score the whole sets as ``phase`` ended at ``step`` (its "after")."""
        scores, images = self._scored(subsample=False)
        if scores is not None:
            self.report.end_phase(phase.name, phase.kind.value, step, scores, images)
            self._log(logging.INFO, f"after {phase.name} (step {step}) {_fmt(scores)}")
        return scores

    def _scored(self, subsample: bool) -> tuple[dict[str, float] | None, dict[str, int] | None]:
        """``host.score(subsample)`` timed into the report, as (scores, images per set or ``None``)."""
        with self.report.timed():
            out = self.host.score(subsample)
        scores, images = out if isinstance(out, tuple) else (out, None)
        return (None if scores is None else dict(scores)), (None if images is None else dict(images))

    def _is_subsample(self, images: Mapping[str, int] | None) -> bool:
        """Whether a score read fewer images than the whole sets did (a set smaller than the subsample is whole)."""
        whole = next((r["images"] for r in self.report.curve if "images" in r and not r["subsample"]), None)
        return images is not None and whole is not None and any(images[s] < whole[s] for s in images)

    # -- a whole step, for a host without a loop of its own ------------------------------------------------------
    def begin(self) -> None:
        """Score "before" unless resumed (``score_before``)."""
        self.score_before()

    def loss(self) -> PhaseLossOutput:
        """The current step's loss: one batch per role of the current phase through the host's forward."""
        out = self.phase_loss(self.host.task_losses(self.next_batches()))
        if "forget/task" in out.terms:
            self.observe_forget_loss(float(out.terms["forget/task"]))
        return out

    def step_done(self) -> dict[str, float] | None:
        """Count the optimizer step; score the whole sets at a phase end (then ``host.save``), or the subsamples
        every ``eval_interval`` steps.

        Returns:
            The scores when the sets were scored at this step (``None`` otherwise, or off the process holding them).
        """
        phase = self.phase
        ended = self.count_step()
        step = self.scheduler.global_step
        if ended:
            scores = self.score_phase_end(phase, step)
            self.host.save(self.state_dict(), phase.name)
            return scores
        if self.eval_interval and step % self.eval_interval == 0:
            return self.score_during(phase, step)
        return None

    def run(self, optimizer_step: Callable[[torch.Tensor], None]) -> SwapReport:
        """The whole swap in a plain loop; ``optimizer_step(loss)`` back-propagates and steps the optimizer."""
        self.begin()
        while not self.done:
            optimizer_step(self.loss().total)
            self.step_done()
        self.report.tick()
        return self.report

    # -- resume --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position, loader positions, report and teacher: all a resume needs besides model and optimizer (the
        report's run time ticked up to now)."""
        self.report.tick()
        state = {"scheduler": self.scheduler.state_dict(), "report": self.report.to_dict(),
                 "loaders": [{role: it.state_dict() for role, it in roles.items()} for roles in self.loaders],
                 "config": self.config.to_dict()}
        if self._teacher is not None:
            state["teacher"] = {"phase": self._teacher[0], "lora": self._teacher[1].state_dict()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for roles, saved in zip(self.loaders, state["loaders"], strict=True):
            for role, it in roles.items():
                it.load_state_dict(saved[role])
        self.report = SwapReport.from_dict(state["report"])
        teacher = state.get("teacher")
        if teacher is not None:
            self._teacher = (teacher["phase"], LoraSnapshot.from_state_dict(self.prepared.model, teacher["lora"]))

    def export(self, out_dir: str | Path, **meta: Any) -> dict[str, Path]:
        """Write the report, the merged model (``model_swapped.pth``: ``state_dict``, the rounds and ``meta``) and
        the adapter (``swap_adapter.safetensors``: the LoRA weights and new head rows, with the config, grown rows
        and rounds, for ``apply_adapter`` / ``revert_adapter``). The session's model keeps its LoRA layers."""
        if not self.report.phases:
            raise SwapConfigError("export() before any phase ended: run the swap first.")
        out = Path(out_dir)
        self.report.tick()
        paths = self.report.write(out)
        rounds = self.rounds
        paths["model"] = write_merged_model(self.prepared.model, out, rounds=rounds, **meta)
        paths["adapter"] = write_adapter(self.prepared.model, out, self.config, self.prepared.grown,
                                         self.report.classes, rounds)
        return paths


def _fmt(scores: Mapping[str, float]) -> str:
    """The scores as logged: ``swap/forget: 12.3456  swap/retain: ...``, the three sets first, then any extra."""
    ordered = [*SETS, *(k for k in scores if k not in SETS)]
    return "  ".join(f"{score_key(k)}: {scores[k]:.4f}" for k in ordered)


def mean_over_ranks(value: float | torch.Tensor) -> float:
    """``value`` averaged over the processes of the default ``torch.distributed`` group (itself outside one)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return float(value)
    if isinstance(value, torch.Tensor):
        device = value.device
    else:  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")
    total = torch.as_tensor(value, dtype=torch.float64).detach().to(device).clone()
    torch.distributed.all_reduce(total)
    return float(total) / torch.distributed.get_world_size()
