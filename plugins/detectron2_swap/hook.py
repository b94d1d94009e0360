"""``SwapHook``: the host of the swap's ``kswap.SwapSession`` inside a detectron2 trainer.

The session walks the phases: at a phase's first step the hook starts it (the phase's fresh optimizer and LR
schedule, as the reference segmentation recipe), the trainer's ``SwapDataLoader`` draws each step's role batches
from the session, and the model's loss is its phase loss. The hook scores the sets before the swap, every
``eval_period`` iterations (a seeded subsample of each set) and at each phase end (the whole sets, then a
checkpoint), records the first forget loss of a forget phase against the bound (the mean over the processes), and
keeps the session's state (phase position, report, the phase's LR schedule, the role loaders' positions, the
random generator) in the trainer's checkpoints, so ``--resume`` continues the phase as it would have gone on.
After the last phase it writes the report, the merged plain model, the LoRA adapter alone and the sets'
joint-label test data for detectron2's stock evaluation, then runs the unlearning audit when given one (on copies,
after the outputs are written) and adds it to the report. Scores are logged as ``swap/<set>`` (unsmoothed, and
written to ``metrics.json`` and TensorBoard at the step they were scored), the loss terms (``model.py``) as
``swap/loss/<term>``.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter
from torch import nn

from kswap import (
    Phase,
    PreparedModel,
    StopRequests,
    SwapConfigError,
    SwapSession,
    lora_state_dict,
    loss_key,
    score_key,
)

from .data import RoleBatches, SwapDataLoader
from .export import export_test_sets
from .model import every_term
from .plan import SETS, SwapPlan

# Under detectron2's logger, which default_setup (and so every train_net.py) gives its handlers.
logger = logging.getLogger(f"detectron2.{__name__}")

# score(subsample) -> (per-set mIoU or None off the main process, per set the number of images scored)
Scores = Callable[[bool], "tuple[dict[str, float] | None, dict[str, int]]"]


class SwapHook(HookBase):
    """The swap's phases in a trainer whose data loader is ``data_loader``.

    Args:
        plan: the swap plan.
        model: the prepared model (not the DDP wrapper).
        data_loader: the trainer's ``SwapDataLoader`` (the hook binds it to the session).
        score: ``score(subsample)``, the per-set mIoU of the current model over the whole test sets, or over a
            seeded subsample of each set when ``subsample`` (the periodic scores), and the number of images each
            set's score read (e.g. ``evaluation.SetScorer``); every process calls it, the main process gets the
            scores (the others ``None``).
        checkpointer: saves a checkpoint at each phase end.
        out_dir: where the report and the merged model go.
        build_optimizer: a fresh optimizer over the model's trainable parameters (when the plan resets it).
        build_lr_scheduler: an LR schedule over ``n`` iterations for an optimizer (when the plan restarts it).
        eval_period: also score the sets' subsamples every this many iterations (0: only at phase ends).
        chain_from_iter: start each next phase from the LoRA weights at this iteration of the previous phase
            (the reference's restart at 3000); 0 chains from the final weights.
        write_config: writes the host's config for the merged model (``config_swapped.yaml``) with the other
            outputs, before any later hook (such as an evaluation) can fail.
        audit: the unlearning audit of the prepared model (``SwapReport.audit``), called by every process after
            the outputs are written (e.g. ``audit.SegmentationAudit``).
        parent: ``kswap.parent_of`` the checkpoint the swap starts from (``MODEL.WEIGHTS``), for the adapter.
    """

    def __init__(
        self,
        plan: SwapPlan,
        model: nn.Module,
        data_loader: SwapDataLoader,
        score: Scores,
        checkpointer: Any,
        out_dir: str | Path,
        build_optimizer: Callable[[], torch.optim.Optimizer] | None = None,
        build_lr_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
        eval_period: int = 0,
        chain_from_iter: int = 0,
        write_config: Callable[[], Path] | None = None,
        audit: Callable[[nn.Module], dict[str, Any]] | None = None,
        parent: str = "",
    ) -> None:
        self.plan = plan
        self.model = model
        self.data_loader = data_loader
        self.score_sets = score
        self.checkpointer = checkpointer
        self.out_dir = Path(out_dir)
        self.build_optimizer = build_optimizer
        self.build_lr_scheduler = build_lr_scheduler
        self.chain_from_iter = chain_from_iter
        self.write_config = write_config
        self.audit = audit
        state = model.swap_state
        self.session = SwapSession(
            plan.config, self, PreparedModel(model, state.grown, state.groups, state.adapted), metric="mIoU",
            classes={s: [plan.space.names[i] for i in plan.sets[s]] for s in SETS}, eval_interval=eval_period,
            is_loss=every_term, log=lambda level, message: logger.log(level, f"Swap: {message}"), parent=parent)
        # A function, not the bound method: copies of the model (the merged export) must not copy the session.
        state.loss = lambda task: self.session.phase_loss(task)
        data_loader.bind(self.session)
        chained = self.session.scheduler.phase_steps[:-1]
        if chain_from_iter and chained and chain_from_iter >= min(chained):
            raise SwapConfigError(f"cfg.SWAP.CHAIN_FROM_ITER={chain_from_iter} must be below the length of every phase "
                                  f"that another follows ({chained} iterations).")
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.unwritten_scores = False
        self.stop = StopRequests()

    @property
    def restarts_lr(self) -> bool:
        return self.plan.config.restart_lr_schedule and self.build_lr_scheduler is not None

    # -- trainer hooks ------------------------------------------------------------------------------------------
    def before_train(self) -> None:
        self.stop.install()
        self.put_scores(self.session.score_before())

    def before_step(self) -> None:
        # Before the trainer's other hooks see the step: its optimizer and LR schedule are the phase's.
        self.session.start_phase()

    def after_step(self) -> None:
        session = self.session
        if session.awaits_forget_loss():
            session.observe_forget_loss(self.trainer.storage.history(loss_key("forget/task")).latest())
        # At a phase end: the whole sets scored, then ``save`` (a checkpoint).
        self.put_scores(session.step_done())
        if self.unwritten_scores:
            self.write_scores()
        if self.chain_from_iter and not session.done and session.scheduler.step_in_phase == self.chain_from_iter:
            self.snapshot = {k: v.detach().clone() for k, v in lora_state_dict(self.model).items()}
        signum = self.stop.received(next(self.model.parameters()).device)
        if signum is not None:
            self.checkpointer.save(f"model_{self.trainer.iter:07d}", iteration=self.trainer.iter)
            message = (f"Swap: stopped by {signal.Signals(signum).name} after iteration "
                       f"{self.trainer.iter}, with a checkpoint: --resume goes on from there.")
            logger.warning(message)
            raise KeyboardInterrupt(message)

    def after_train(self) -> None:
        self.stop.uninstall()
        if not self.session.done:
            return
        if comm.is_main_process():
            self.export()
        if self.audit is not None:
            logger.info("Swap: unlearning audit of the pretrained and the swapped model")
            report = self.session.report
            report.audit = self.audit(self.model)
            if comm.is_main_process():
                report.tick()
                report.write(self.out_dir)
                logger.info("Swap report with the audit:\n" + report.to_markdown())

    def put_scores(self, scores: dict[str, float] | None) -> None:
        """Log the sets' mIoU in the trainer's EventStorage as ``swap/<set>`` (when this process holds them),
        unsmoothed: detectron2's writers would log the median of the scores so far."""
        if scores is not None:
            self.trainer.storage.put_scalars(**{score_key(k): v for k, v in scores.items()}, smoothing_hint=False)
            self.unwritten_scores = True

    def write_scores(self) -> None:
        """Write the step's scalars, the scores among them, with the trainer's writers now, but the console
        printer: the writers keep only a scalar's latest value, which the next scores would replace before the
        writers' period comes."""
        self.unwritten_scores = False
        for hook in self.trainer._hooks:
            if isinstance(hook, hooks.PeriodicWriter):
                for writer in hook._writers:
                    if not isinstance(writer, CommonMetricPrinter):
                        writer.write()

    # -- the session's host (kswap.SwapHost); the model's forward gives the task losses ---------------------------
    def role_loader(self, phase: Phase, role: str, sets: tuple[str, ...]) -> RoleBatches:
        return self.data_loader.role_loader(sets)

    def score(self, subsample: bool = False) -> tuple[dict[str, float] | None, dict[str, int]]:
        return self.score_sets(subsample)

    def start_phase(self, phase: Phase) -> None:
        """The phase's optimizer (fresh after the first phase when the plan resets it) and LR schedule."""
        trainer = self.trainer
        if phase.index > 0 and self.plan.config.reset_optimizer_between_phases and self.build_optimizer:
            trainer.optimizer = self.build_optimizer()
            for hook in trainer._hooks:
                if isinstance(hook, hooks.LRScheduler):
                    hook._optimizer = trainer.optimizer  # it reports the LR of the optimizer it was given
        if self.restarts_lr:
            trainer.scheduler = self.build_lr_scheduler(trainer.optimizer, self.phase_steps(phase))
        logger.info(f"Swap: phase {phase.name} ({self.phase_steps(phase)} iterations, roles {dict(phase.sources)})")

    def phase_steps(self, phase: Phase) -> int:
        return self.session.scheduler.phase_steps[phase.index]

    def save(self, state: dict[str, Any], tag: str) -> None:
        """At a phase end: the next phase starts from the chained weights (``chain_from_iter``), then a checkpoint
        (``model_swap_<phase>.pth``, holding the hook's state) that a resume starts the next phase from."""
        if self.snapshot is not None and not self.session.done:
            self.model.load_state_dict(self.snapshot, strict=False)
            logger.info(f"Swap: the next phase starts from the weights of iteration {self.chain_from_iter} of {tag}")
        self.snapshot = None
        self.checkpointer.save(f"model_swap_{tag}", iteration=self.trainer.iter)

    def export(self) -> dict[str, Path]:
        """Write the swap report, ``model_swapped.pth`` (LoRA merged, the original keys under ``model`` as
        detectron2's checkpointer reads them, the joint classes), ``swap_adapter.safetensors`` (the LoRA alone), the
        sets' joint-label test data, and the config for the merged model when the host gave ``write_config``."""
        paths = self.session.export(self.out_dir, key="model", classes=list(self.plan.space.names))
        paths["test_sets"] = export_test_sets(self.plan, self.out_dir)
        if self.write_config is not None:
            paths["config"] = self.write_config()
        logger.info("Swap report:\n" + self.session.report.to_markdown())
        return paths

    # -- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The session's state, the role loaders' positions, the phase's LR schedule and the model's random
        generator (e.g. Mask2Former's point sampling draws from it; the data draws from its own, ``data.py``)."""
        state = self.session.state_dict()  # its report's run time ticked: a resumed run continues it
        state["data"] = self.data_loader.state_dict()
        state["rng"] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        if self.restarts_lr:
            state["lr_scheduler"] = self.trainer.scheduler.state_dict()
        if self.snapshot is not None:
            state["snapshot"] = self.snapshot
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session.load_state_dict(state)
        self.data_loader.load_state_dict(state["data"])
        drawn = sum(s["drawn"] for s in state["data"]["streams"])
        logger.info(f"Swap: resuming at step {self.session.scheduler.global_step}; the role loaders read the {drawn} "
                    "batches they had drawn again, to go on with the batches that came next")
        # The main process saved its generators; the other processes keep theirs.
        if comm.is_main_process():
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.snapshot = state.get("snapshot")
        if self.restarts_lr and not self.session.done and not self.session.scheduler.at_phase_start:
            trainer = self.trainer
            trainer.scheduler = self.build_lr_scheduler(trainer.optimizer, self.phase_steps(self.session.phase))
            trainer.scheduler.load_state_dict(state["lr_scheduler"])
