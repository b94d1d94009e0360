"""``SwapHook``: walks the swap's phases inside a detectron2 trainer, scores the sets and writes the outputs.

Per step it counts the phase position (the data loader reads it for the next batch); at a phase start it sets
the phase's loss weights and, as the reference segmentation recipe, a fresh optimizer and LR schedule; at a
phase end it scores forget / retain / learn, records them in the swap report and saves a checkpoint. Its state
(phase position, report, the phase's LR schedule) is part of the trainer's checkpoints, so ``--resume``
continues the phase. "Before" is the pretrained model's score (the grown rows hidden); each forget phase records
its forget loss at the start against the bound (resolving a relative one). After the last phase it writes the
report, the merged plain model, the LoRA adapter alone and the sets' joint-label test data for detectron2's stock
evaluation, then runs the unlearning audit when given one (on copies, after the outputs are written) and adds it to
the report. Scores are logged as ``swap/<set>``, the loss terms (``model.py``) as ``swap/loss/<term>``.

"Before" and the phase ends score the whole test sets; the scores every ``eval_period`` iterations (the curve) a
seeded subsample of each set. The report records the images each score read, the seconds spent scoring and the
run's wall time (added before each save of the hook's state and at the end, so a resumed run keeps adding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from torch import nn

from kswap import (
    Phase,
    PhaseScheduler,
    SwapConfigError,
    SwapReport,
    hidden_new_classes,
    lora_state_dict,
    loss_key,
    score_key,
    write_adapter,
    write_merged_model,
)

from .export import export_test_sets
from .plan import SETS, SwapPlan

# Under detectron2's logger, which default_setup (and so every train_net.py) gives its handlers.
logger = logging.getLogger(f"detectron2.{__name__}")

# score(subsample) -> (per-set mIoU or None off the main process, per set the number of images scored)
Scores = Callable[[bool], "tuple[dict[str, float] | None, dict[str, int]]"]


class SwapHook(HookBase):
    """The swap's phases in a trainer whose data loader is a ``SwapDataLoader`` bound to ``self.scheduler``.

    Args:
        plan: the swap plan.
        model: the prepared model (not the DDP wrapper).
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
    """

    def __init__(
        self,
        plan: SwapPlan,
        model: nn.Module,
        score: Scores,
        checkpointer: Any,
        out_dir: str | Path,
        build_optimizer: Callable[[], torch.optim.Optimizer] | None = None,
        build_lr_scheduler: Callable[[torch.optim.Optimizer, int], Any] | None = None,
        eval_period: int = 0,
        chain_from_iter: int = 0,
        write_config: Callable[[], Path] | None = None,
        audit: Callable[[nn.Module], dict[str, Any]] | None = None,
    ) -> None:
        self.plan = plan
        self.model = model
        self.score = score
        self.checkpointer = checkpointer
        self.out_dir = Path(out_dir)
        self.build_optimizer = build_optimizer
        self.build_lr_scheduler = build_lr_scheduler
        self.eval_period = eval_period
        self.chain_from_iter = chain_from_iter
        self.write_config = write_config
        self.audit = audit
        self.scheduler = PhaseScheduler(plan.phases, fingerprint=plan.config.fingerprint())
        chained = self.scheduler.phase_steps[:-1]
        if chain_from_iter and chained and chain_from_iter >= min(chained):
            raise SwapConfigError(f"cfg.SWAP.CHAIN_FROM_ITER={chain_from_iter} must be below the length of every phase "
                                  f"that another follows ({chained} iterations).")
        self.report = SwapReport(order=plan.config.order.value, metric="mIoU",
                                 classes={s: [plan.space.names[i] for i in plan.sets[s]] for s in SETS})
        self.snapshot: dict[str, torch.Tensor] | None = None
        self._clock = time.perf_counter()

    @property
    def restarts_lr(self) -> bool:
        return self.plan.config.restart_lr_schedule and self.build_lr_scheduler is not None

    # -- trainer hooks ------------------------------------------------------------------------------------------
    def before_train(self) -> None:
        if self.report.before is None:
            # The pretrained model's scores: the grown head's new rows (LoRA still zero) must not take any pixel.
            with hidden_new_classes(self.model, self.model.swap_state.grown):
                scores, images = self.scored()
            if scores is not None:
                self.report.set_before(scores, images)
                logger.info(f"Swap: before {scores}")

    def before_step(self) -> None:
        phase = self.scheduler.phase
        if self.scheduler.at_phase_start:
            self.start_phase(phase)
        # A relative forgetting bound, once measured, holds for the rest of the phase (and after a resume).
        self.model.swap_state.weights = self.report.phase_weights(phase.name, phase.loss)

    def after_step(self) -> None:
        phase = self.scheduler.phase
        if "forget" in phase.sources and phase.name not in self.report.forget_bounds:
            self.check_forget_bound(phase)
        ended = self.scheduler.step()
        if self.chain_from_iter and self.scheduler.step_in_phase == self.chain_from_iter:
            self.snapshot = {k: v.detach().clone() for k, v in lora_state_dict(self.model).items()}
        if ended:
            self.end_phase(phase)
        elif self.eval_period and self.scheduler.global_step % self.eval_period == 0:
            scores, images = self.scored(subsample=True)
            if scores is not None:
                self.report.record(self.scheduler.global_step, phase.name, scores, images, subsample=True)
                self.put_scores(scores)

    def after_train(self) -> None:
        if not self.scheduler.done:
            return
        if comm.is_main_process():
            self.export()
        if self.audit is not None:
            logger.info("Swap: unlearning audit of the pretrained and the swapped model")
            self.report.audit = self.audit(self.model)
            if comm.is_main_process():
                self.tick()
                self.report.write(self.out_dir)
                logger.info("Swap report with the audit:\n" + self.report.to_markdown())

    # -- phases -------------------------------------------------------------------------------------------------
    def start_phase(self, phase: Phase) -> None:
        self.model.swap_state.weights = phase.loss
        trainer = self.trainer
        if phase.index > 0 and self.plan.config.reset_optimizer_between_phases and self.build_optimizer:
            trainer.optimizer = self.build_optimizer()
            for hook in trainer._hooks:
                if isinstance(hook, hooks.LRScheduler):
                    hook._optimizer = trainer.optimizer  # it reports the LR of the optimizer it was given
        if self.restarts_lr:
            trainer.scheduler = self.build_lr_scheduler(trainer.optimizer, self.scheduler.phase_steps[phase.index])
        logger.info(f"Swap: phase {phase.name} ({self.scheduler.phase_steps[phase.index]} iterations, "
                    f"roles {dict(phase.sources)})")

    def check_forget_bound(self, phase: Phase) -> None:
        """Record the forget-set task loss of the phase's first step and the bound it works against (every process
        resolves a relative bound from the same mean), and warn when the bound is inactive."""
        measured = comm.all_gather(self.trainer.storage.history(loss_key("forget/task")).latest())
        warning = self.report.start_forget_phase(phase.name, phase.loss, sum(measured) / len(measured))
        if warning:
            logger.warning(f"Swap: {warning}")

    def scored(self, subsample: bool = False) -> tuple[dict[str, float] | None, dict[str, int]]:
        """``score(subsample)``, its wall time added to the report's ``timing["scoring_s"]``."""
        with self.report.timed():
            return self.score(subsample)

    def tick(self) -> None:
        """Add the wall time since the last tick to the report's ``timing["run_s"]``."""
        now = time.perf_counter()
        self.report.timing["run_s"] += now - self._clock
        self._clock = now

    def put_scores(self, scores: dict[str, float]) -> None:
        """Log the sets' mIoU in the trainer's EventStorage as ``swap/<set>``."""
        self.trainer.storage.put_scalars(**{score_key(k): v for k, v in scores.items()})

    def end_phase(self, phase: Phase) -> None:
        scores, images = self.scored()
        if scores is not None:
            self.report.end_phase(phase.name, phase.kind.value, self.scheduler.global_step, scores, images)
            self.put_scores(scores)
            logger.info(f"Swap: after {phase.name} {scores}")
        if self.snapshot is not None and not self.scheduler.done:
            self.model.load_state_dict(self.snapshot, strict=False)
            logger.info(f"Swap: the next phase starts from the weights of iteration {self.chain_from_iter} of "
                        f"{phase.name}")
        self.snapshot = None
        self.checkpointer.save(f"model_swap_{phase.name}", iteration=self.trainer.iter)

    def export(self) -> dict[str, Path]:
        """Write the swap report, ``model_swapped.pth`` (LoRA merged, the original keys under ``model`` as
        detectron2's checkpointer reads them, the joint classes), ``swap_adapter.safetensors`` (the LoRA alone), the
        sets' joint-label test data, and the config for the merged model when the host gave ``write_config``."""
        self.tick()
        paths = self.report.write(self.out_dir)
        paths["model"] = write_merged_model(self.model, self.out_dir, key="model", classes=list(self.plan.space.names))
        paths["adapter"] = write_adapter(self.model, self.out_dir, self.plan.config, self.model.swap_state.grown,
                                         self.report.classes)
        paths["test_sets"] = export_test_sets(self.plan, self.out_dir)
        if self.write_config is not None:
            paths["config"] = self.write_config()
        logger.info("Swap report:\n" + self.report.to_markdown())
        return paths

    # -- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.tick()  # the run's time so far goes into the checkpoint a resumed run continues from
        state: dict[str, Any] = {"scheduler": self.scheduler.state_dict(), "report": self.report.to_dict()}
        if self.restarts_lr:
            state["lr_scheduler"] = self.trainer.scheduler.state_dict()
        if self.snapshot is not None:
            state["snapshot"] = self.snapshot
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.report = SwapReport.from_dict(state["report"])
        self._clock = time.perf_counter()
        self.snapshot = state.get("snapshot")
        if self.scheduler.done:
            return
        phase = self.scheduler.phase
        self.model.swap_state.weights = phase.loss
        if self.restarts_lr and not self.scheduler.at_phase_start:
            trainer = self.trainer
            trainer.scheduler = self.build_lr_scheduler(trainer.optimizer, self.scheduler.phase_steps[phase.index])
            trainer.scheduler.load_state_dict(state["lr_scheduler"])
