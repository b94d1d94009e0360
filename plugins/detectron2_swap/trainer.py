"""``SwapTrainerMixin``: knowledge swapping in the user's own ``DefaultTrainer`` subclass, from ``cfg.SWAP``.

    class Trainer(SwapTrainerMixin, Trainer):  # Mask2Former's Trainer keeps its mapper, optimizer and schedule
        pass

``DefaultTrainer.__init__`` builds the model, then the optimizer, the loader and DDP, then the hooks; the mixin
acts at each of these points: the model is grown, LoRA-injected and frozen inside ``build_model`` (so the
optimizer sees only LoRA and DDP wraps the final module), the train loader follows the phases, the checkpointer
maps the pretrained weights, and a ``SwapHook`` runs the phases. ``SOLVER.MAX_ITER`` becomes the swap's length and
``SWAP.SOLVER`` gives the LR, LR schedule, AMP and backbone multiplier the user's optimizer and schedule are built
with; ``SWAP.AUDIT.ENABLED`` adds the unlearning audit to the report. detectron2's ``EvalHook`` is left out: the
grown model predicts classes that the evaluators of ``DATASETS.TEST`` do not know, and the swap scores its own
sets. Checkpoints hold the optimizer's state (and AMP's grad scaler), which detectron2 0.6 leaves out, so a resume
goes on as the run would have. With ``SWAP.ENABLED: False`` the trainer is the user's, unchanged, but for
``build_evaluator`` of a swapped model's test sets (``--eval-only`` on ``config_swapped.yaml``): each set's files
go to ``inference/<set>/`` and its results add the set's score.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, hooks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kswap import MODEL_FILE, SwapConfigError, atomic_write_text, parent_of

from .audit import SegmentationAudit, probed_modules
from .checkpoint import SwapCheckpointer
from .config import CONSTANT_LR, audit_settings_from_cfg, solver_overrides
from .data import SwapDataLoader
from .evaluation import SetScoreEvaluator, SetScorer
from .export import swapped_test_datasets
from .hook import SwapHook
from .model import prepare_swap_model
from .plan import SwapPlan

# Under detectron2's logger, which default_setup (and so every train_net.py) gives its handlers.
logger = logging.getLogger(f"detectron2.{__name__}")

DEFAULT_TRAINER_SAVES_OPTIMIZER = "state_dict" in vars(DefaultTrainer)


def _with(cfg: CfgNode, values: dict[str, Any]) -> CfgNode:
    """A frozen copy of ``cfg`` with ``{"SOLVER.MAX_ITER": n, ...}`` merged in (types checked as by yacs)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list([item for pair in values.items() for item in pair])
    cfg.freeze()
    return cfg


def swap_enabled(cfg: CfgNode) -> bool:
    """``cfg.SWAP.ENABLED``; a config without the SWAP node is refused with the fix."""
    if "SWAP" not in cfg:
        raise SwapConfigError("The config has no SWAP node: call detectron2_swap.add_swap_config(cfg) in setup(), "
                              "before merge_from_file.")
    return bool(cfg.SWAP.ENABLED)


class SwapTrainerMixin:
    """Put it before the user's trainer class: ``class Trainer(SwapTrainerMixin, Trainer)``."""

    swap_plan: SwapPlan
    swap_hook: SwapHook

    def __init__(self, cfg: CfgNode) -> None:
        if not swap_enabled(cfg):
            super().__init__(cfg)
            return
        # Everything the swap needs from the config and the catalogs is checked before a model is built.
        self.swap_plan = SwapPlan.from_cfg(cfg)
        self.swap_audit = audit_settings_from_cfg(cfg) if cfg.SWAP.AUDIT.ENABLED else None
        # The periodic scores' subsample is one draw for every process and every resume: SEED when set, else 0.
        self.swap_scorer = SetScorer(self.swap_plan, lambda name: self.build_test_loader(cfg, name),
                                     subsample_images=cfg.SWAP.EVAL_IMAGES, seed=max(cfg.SEED, 0))
        self.swap_user_cfg = cfg  # what config_swapped.yaml is written from: the user's SOLVER, not the swap's
        total = sum(p.length.steps for p in self.swap_plan.phases)
        super().__init__(_with(cfg, {"SOLVER.MAX_ITER": total, **solver_overrides(cfg)}))
        self._log_solver()

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = super().build_model(cfg)
        if swap_enabled(cfg):
            prepare_swap_model(model, SwapPlan.from_cfg(cfg), cfg.SWAP.HEAD.NAME, cfg.SWAP.HEAD.TRAILING_ROWS)
        return model

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> Any:
        if swap_enabled(cfg) and cfg.SWAP.SOLVER.LR_SCHEDULER_NAME == CONSTANT_LR:
            return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        return super().build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None) -> Any:
        """The user's evaluator; for a swapped model's test set (its metadata's ``swap_set``, as README registers
        ``swapped_datasets.json``) in ``OUTPUT_DIR/inference/<set>/``, with the set's score added
        (``SetScoreEvaluator``)."""
        meta = MetadataCatalog.get(dataset_name)
        set_name = meta.get("swap_set")
        if set_name is None:
            return super().build_evaluator(cfg, dataset_name, **({} if output_folder is None else
                                                                  {"output_folder": output_folder}))
        folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", set_name)
        if "output_folder" in inspect.signature(super().build_evaluator).parameters:
            evaluator = super().build_evaluator(cfg, dataset_name, output_folder=folder)
        else:
            logger.warning(f"Swap: {cls.__name__}.build_evaluator takes no output_folder (as detectron2's and "
                           f"Mask2Former's train_net.py do): each set's files go to its one folder, not {folder}.")
            evaluator = super().build_evaluator(cfg, dataset_name)
        return SetScoreEvaluator(evaluator, set_name, meta.swap_classes)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        if not swap_enabled(cfg):
            return super().build_train_loader(cfg)
        batch = cfg.SWAP.IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH
        # One data order for every run of the config, so a resumed run can replay it: SEED when set, else 0.
        return SwapDataLoader(SwapPlan.from_cfg(cfg), lambda datasets: cls.users_train_loader(cfg, datasets, batch),
                              seed=max(cfg.SEED, 0))

    @classmethod
    def users_train_loader(cls, cfg: CfgNode, datasets: tuple[str, ...], batch: int) -> Any:
        """The user's ``build_train_loader`` over ``datasets`` with ``batch`` images per step."""
        return super().build_train_loader(_with(cfg, {"DATASETS.TRAIN": datasets, "SOLVER.IMS_PER_BATCH": batch}))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if swap_enabled(self.cfg):
            # detectron2 0.6's DefaultTrainer saves the iteration and the hooks' states only; later versions add
            # the optimizer (and AMP's grad scaler) under this key, which a resume needs.
            state.setdefault("_trainer", self._trainer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if swap_enabled(self.cfg) and not DEFAULT_TRAINER_SAVES_OPTIMIZER and "_trainer" in state:
            self._trainer.load_state_dict(state["_trainer"])

    def build_hooks(self) -> list:
        if not swap_enabled(self.cfg):
            return super().build_hooks()
        cfg = self.cfg
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        # DefaultTrainer makes its checkpointer just before build_hooks; the periodic checkpointer built by
        # super().build_hooks() must hold this one.
        self.checkpointer = SwapCheckpointer(self.model, cfg.OUTPUT_DIR, grown=model.swap_state.grown,
                                             trainer=weakref.proxy(self))
        self.swap_hook = SwapHook(
            self.swap_plan,
            model,
            self.data_loader,
            score=lambda subsample: self.swap_scorer(self.model, subsample=subsample),
            checkpointer=self.checkpointer,
            out_dir=cfg.OUTPUT_DIR,
            build_optimizer=lambda: self.build_optimizer(cfg, model),
            build_lr_scheduler=lambda optimizer, n: self.build_lr_scheduler(_with(cfg, {"SOLVER.MAX_ITER": n}),
                                                                            optimizer),
            eval_period=cfg.SWAP.EVAL_PERIOD,
            chain_from_iter=cfg.SWAP.CHAIN_FROM_ITER,
            write_config=lambda: write_swapped_config(self.swap_user_cfg, Path(cfg.OUTPUT_DIR),
                                                      len(self.swap_plan.space.names)),
            audit=self._build_audit(),
            parent=parent_of(cfg.MODEL.WEIGHTS),
        )
        ret = [h for h in super().build_hooks() if h is not None and not isinstance(h, hooks.EvalHook)]
        if cfg.DATASETS.TEST:
            periodic = (f"every SWAP.EVAL_PERIOD ({cfg.SWAP.EVAL_PERIOD}) iterations on at most SWAP.EVAL_IMAGES "
                        f"({cfg.SWAP.EVAL_IMAGES}) images per set and " if cfg.SWAP.EVAL_PERIOD else "")
            logger.info(f"Swap: detectron2's evaluation of DATASETS.TEST {tuple(cfg.DATASETS.TEST)} (TEST.EVAL_PERIOD "
                        f"{cfg.TEST.EVAL_PERIOD}) is replaced by the swap's per-set mIoU of SWAP.DATASETS.*_TEST, "
                        f"{periodic}on the whole sets before the swap and at each phase end: the swapped model "
                        "predicts classes those evaluators do not know.")
        # After the LR hook (its step of the phase's last iteration is in the phase-end checkpoint), before the
        # checkpointer and the writers (they see the phase position after the step).
        at = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)), 0)
        return ret[:at] + [self.swap_hook] + ret[at:]

    def _build_audit(self) -> SegmentationAudit | None:
        if self.swap_audit is None:
            return None
        cfg = self.cfg
        probed_modules(self.model.module if isinstance(self.model, DistributedDataParallel) else self.model,
                       cfg.SWAP.AUDIT.FEATURES)  # a missing module fails now, not after the swap
        return SegmentationAudit(self.swap_plan, self.swap_audit, lambda name: self.build_test_loader(cfg, name),
                                 lambda datasets, batch: self.users_train_loader(cfg, datasets, batch),
                                 batch_size=cfg.SWAP.IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH,
                                 features=cfg.SWAP.AUDIT.FEATURES, probe_images=cfg.SWAP.AUDIT.PROBE_IMAGES)

    def _log_solver(self) -> None:
        """Say once what the swap optimises with, as built by the user's optimizer and schedule."""
        cfg, optimizer = self.cfg, self.optimizer
        lrs = sorted({group["lr"] for group in optimizer.param_groups})
        fresh = "a fresh optimizer per phase" if self.swap_plan.config.reset_optimizer_between_phases else \
            "one optimizer for all phases"
        restart = ", restarted per phase" if self.swap_plan.config.restart_lr_schedule else ""
        multiplier = f", SOLVER.BACKBONE_MULTIPLIER {cfg.SOLVER.BACKBONE_MULTIPLIER}" \
            if "BACKBONE_MULTIPLIER" in cfg.SOLVER else ""
        logger.info(f"Swap: {type(optimizer).__name__} from {type(self).__name__}.build_optimizer ({fresh}), "
                    f"{len(optimizer.param_groups)} param groups at LR {lrs}{multiplier}; LR schedule "
                    f"{cfg.SWAP.SOLVER.LR_SCHEDULER_NAME}{restart}; {'AMP' if cfg.SOLVER.AMP.ENABLED else 'fp32'} "
                    f"({type(self._trainer).__name__}). Set SWAP.SOLVER.* to change them.")


def write_swapped_config(cfg: CfgNode, out_dir: Path, num_classes: int) -> Path:
    """``config_swapped.yaml``: the run's config without ``SWAP``, sized for the joint classes, pointing at
    ``model_swapped.pth`` and testing on the sets' joint-label test data (``export.export_test_sets``), for
    evaluating the merged model with plain detectron2."""
    plain = cfg.clone()
    plain.defrost()
    plain.pop("SWAP")
    plain.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    plain.MODEL.WEIGHTS = str(out_dir / MODEL_FILE)
    plain.DATASETS.TEST = swapped_test_datasets()
    return atomic_write_text(out_dir / "config_swapped.yaml", plain.dump())
