"""``SwapTrainerMixin``: knowledge swapping in the user's own ``DefaultTrainer`` subclass, from ``cfg.SWAP``.

    class Trainer(SwapTrainerMixin, Trainer):  # Mask2Former's Trainer keeps its mapper, optimizer and schedule
        pass

``DefaultTrainer.__init__`` builds the model, then the optimizer, the loader and DDP, then the hooks; the mixin
acts at each of these points: the model is grown, LoRA-injected and frozen inside ``build_model`` (so the
optimizer sees only LoRA and DDP wraps the final module), the train loader follows the phases, the checkpointer
maps the pretrained weights, and a ``SwapHook`` runs the phases. ``SOLVER.MAX_ITER`` becomes the swap's length.
With ``SWAP.ENABLED: False`` the trainer is the user's, unchanged.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from detectron2.config import CfgNode
from detectron2.engine import hooks
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kswap import SwapConfigError, atomic_write_text

from .checkpoint import SwapCheckpointer
from .data import SwapDataLoader
from .evaluation import score_sets
from .hook import SwapHook
from .model import prepare_swap_model
from .plan import SwapPlan


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
        total = sum(p.length.steps for p in self.swap_plan.phases)
        super().__init__(_with(cfg, {"SOLVER.MAX_ITER": total}))
        self.data_loader.bind(self.swap_hook.scheduler)

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        model = super().build_model(cfg)
        if swap_enabled(cfg):
            prepare_swap_model(model, SwapPlan.from_cfg(cfg), cfg.SWAP.HEAD.NAME, cfg.SWAP.HEAD.TRAILING_ROWS)
        return model

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        if not swap_enabled(cfg):
            return super().build_train_loader(cfg)
        batch = cfg.SWAP.IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH
        parent = super()

        def build(datasets: tuple[str, ...]) -> Any:
            return parent.build_train_loader(_with(cfg, {"DATASETS.TRAIN": datasets, "SOLVER.IMS_PER_BATCH": batch}))

        return SwapDataLoader(SwapPlan.from_cfg(cfg), build)

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
            score=lambda: score_sets(self.model, self.swap_plan, lambda name: self.build_test_loader(cfg, name)),
            checkpointer=self.checkpointer,
            out_dir=cfg.OUTPUT_DIR,
            build_optimizer=lambda: self.build_optimizer(cfg, model),
            build_lr_scheduler=lambda optimizer, n: self.build_lr_scheduler(_with(cfg, {"SOLVER.MAX_ITER": n}),
                                                                            optimizer),
            eval_period=cfg.SWAP.EVAL_PERIOD,
            chain_from_iter=cfg.SWAP.CHAIN_FROM_ITER,
        )
        ret = [h for h in super().build_hooks() if h is not None]
        # After the LR hook (its step of the phase's last iteration is in the phase-end checkpoint), before the
        # checkpointer and the writers (they see the phase position after the step).
        at = next((i + 1 for i, h in enumerate(ret) if isinstance(h, hooks.LRScheduler)), 0)
        return ret[:at] + [self.swap_hook] + ret[at:]

    def train(self) -> Any:
        result = super().train()
        if swap_enabled(self.cfg) and self.swap_hook.scheduler.done and comm.is_main_process():
            write_swapped_config(self.cfg, Path(self.cfg.OUTPUT_DIR), len(self.swap_plan.space.names))
        return result


def write_swapped_config(cfg: CfgNode, out_dir: Path, num_classes: int) -> Path:
    """``config_swapped.yaml``: the run's config without ``SWAP``, sized for the joint classes and pointing at
    ``model_swapped.pth``, for evaluating the merged model with plain detectron2."""
    plain = cfg.clone()
    plain.defrost()
    plain.pop("SWAP")
    plain.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    plain.MODEL.WEIGHTS = str(out_dir / "model_swapped.pth")
    return atomic_write_text(out_dir / "config_swapped.yaml", plain.dump())
