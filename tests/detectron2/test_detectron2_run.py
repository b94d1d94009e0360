"""The detectron2 swap's run lifecycle under a Mask2Former-style user set-up (real detectron2, CPU).

The user's ``Trainer`` here does what Mask2Former's ``train_net.py`` does where it matters to a swap: a
``SemSegEvaluator`` for ``DATASETS.TEST``, a per-parameter AdamW with ``SOLVER.BACKBONE_MULTIPLIER`` on names holding
"backbone", and DeepLab's poly LR schedule; the config keeps the pretraining's ``DATASETS.TEST``,
``TEST.EVAL_PERIOD``, AMP and LR. The model is ``MiniMask2Former`` (Mask2Former's module names), untrained: these
tests check the lifecycle, not the swap's quality (tests/test_detectron2_swap.py does that).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, hooks
from detectron2.evaluation import SemSegEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.projects.deeplab import add_deeplab_config, build_lr_scheduler
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from detectron2_swap import SwapTrainerMixin
from detectron2_swap.config import solver_overrides
from kswap import CheckpointMismatchError, SwapConfigError, to_plain_keys

from swap_testing.d2_models import MiniMask2Former, glyph_cfg, make_trainer_classes, swap_glyphs

pytestmark = pytest.mark.usefixtures("glyph_spec")


class Mask2FormerLikeTrainer(DefaultTrainer):
    """The parts of Mask2Former's ``Trainer`` a swap meets: evaluator, optimizer groups, poly LR."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str) -> SemSegEvaluator:
        return SemSegEvaluator(dataset_name, distributed=True, output_dir=cfg.OUTPUT_DIR)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = []
        for module_name, module in model.named_modules():
            for param in module.parameters(recurse=False):
                if param.requires_grad:
                    factor = cfg.SOLVER.BACKBONE_MULTIPLIER if "backbone" in module_name else 1.0
                    groups.append({"params": [param], "lr": cfg.SOLVER.BASE_LR * factor, "weight_decay": 0.05})
        return torch.optim.AdamW(groups, cfg.SOLVER.BASE_LR)


class SwapTrainer(SwapTrainerMixin, Mask2FormerLikeTrainer):
    pass


def users_cfg(out: Path, **swap) -> CfgNode:
    """The user's Mask2Former-style pretraining config with a SWAP block (``SWAP.SOLVER`` at its defaults unless
    ``swap`` sets it), from an untrained MiniMask2Former."""
    cfg = glyph_cfg(str(out), meta="MiniMask2Former")
    add_deeplab_config(cfg)
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # what add_maskformer2_config adds; Mask2Former's configs use 0.1
    cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.POLY_LR_POWER = "WarmupPolyLR", 0.9
    cfg.DATASETS.TEST, cfg.TEST.EVAL_PERIOD = ("glyph_digits_val",), 2
    out.mkdir(parents=True, exist_ok=True)
    DetectionCheckpointer(build_model(cfg), str(out)).save("pretrained")
    return swap_glyphs(cfg, out / "pretrained.pth", learn=3, forget=3, **swap)


@pytest.fixture
def d2_logs(tmp_path) -> Iterator[Path]:
    """Logging set up as Mask2Former's train_net.py does (default_setup's loggers, then "mask2former"); the
    loggers are restored afterwards. Yields the log file."""
    names = ("fvcore", "detectron2", "mask2former")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level)
             for n in names}
    out = tmp_path / "logs"
    setup_logger(str(out), distributed_rank=0, name="fvcore")
    setup_logger(str(out), distributed_rank=0)
    setup_logger(output=str(out), distributed_rank=0, name="mask2former")
    yield out / "log.txt"
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


class FailingEvaluation(HookBase):
    """A later hook that fails at the end of training, as an evaluation of the grown model can."""

    def after_train(self) -> None:
        raise RuntimeError("evaluation failed")


def test_users_test_sets_and_eval_period_do_not_break_the_swap(tmp_path, d2_logs):
    cfg = users_cfg(tmp_path)
    seed_all_rng(0)
    trainer = SwapTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()  # detectron2's EvalHook would score glyph_digits_val with 7 classes against 5, and raise
    assert not any(isinstance(h, hooks.EvalHook) for h in trainer._hooks)
    for name in ("swap_report.json", "model_swapped.pth", "config_swapped.yaml"):
        assert (tmp_path / name).exists(), name
    log = d2_logs.read_text()
    assert "detectron2's evaluation of DATASETS.TEST ('glyph_digits_val',) (TEST.EVAL_PERIOD 2) is replaced by the " \
           "swap's per-set mIoU" in log

    # Every output is written before a later hook (an evaluation) can fail.
    out = tmp_path / "second"
    trainer = SwapTrainer(users_cfg(out))
    trainer.register_hooks([FailingEvaluation()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.train()
    for name in ("swap_report.json", "model_swapped.pth", "config_swapped.yaml"):
        assert (out / name).exists(), name
    swapped = CfgNode.load_cfg((out / "config_swapped.yaml").read_text())
    assert (swapped.SOLVER.BASE_LR, swapped.SOLVER.LR_SCHEDULER_NAME) == (3e-3, "WarmupPolyLR")  # the user's
    # Plain detectron2 evaluates it on the sets' test data in the joint label space, not the old-label test set.
    assert swapped.DATASETS.TEST == ["swapped_forget_test", "swapped_retain_test", "swapped_learn_test"]


class LRProbe(HookBase):
    """Per step: the optimizer in use and its groups' LRs (after the swap's phase start, before the step)."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    def before_step(self) -> None:
        optimizer = self.trainer.optimizer
        self.steps.append((id(optimizer), [g["lr"] for g in optimizer.param_groups]))


def backbone_groups(trainer: DefaultTrainer) -> list[bool]:
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    return [names[id(g["params"][0])].startswith("backbone.") for g in trainer.optimizer.param_groups]


def test_swap_owns_its_optimizer_lr_schedule_and_precision(tmp_path, d2_logs):
    cfg = users_cfg(tmp_path)
    cfg.SOLVER.AMP.ENABLED = True  # the user's pretraining ran in AMP at LR 3e-3 with a poly schedule
    seed_all_rng(0)
    trainer = SwapTrainer(cfg)
    assert not isinstance(trainer._trainer, AMPTrainer)  # the reference swap runs in fp32
    backbone = backbone_groups(trainer)
    assert any(backbone) and not all(backbone)
    probe = LRProbe()
    trainer.register_hooks([probe])
    trainer.resume_or_load(resume=False)
    trainer.train()
    # A constant 1e-4 for every group (backbone multiplier 1.0) at every step, and a fresh optimizer per phase.
    assert [lrs for _, lrs in probe.steps] == [[1e-4] * len(backbone)] * 6
    assert len({opt for opt, _ in probe.steps[:3]}) == len({opt for opt, _ in probe.steps[3:]}) == 1
    assert probe.steps[0][0] != probe.steps[3][0]
    log = d2_logs.read_text()
    assert f"Swap: AdamW from SwapTrainer.build_optimizer (a fresh optimizer per phase), {len(backbone)} param " \
           "groups at LR [0.0001], SOLVER.BACKBONE_MULTIPLIER 1.0; LR schedule Constant, restarted per phase; " \
           "fp32 (SimpleTrainer)" in log

    # SWAP.SOLVER overrides reach the user's optimizer and schedule: poly from 1e-3, restarted per phase.
    out = tmp_path / "overridden"
    cfg = users_cfg(out, SOLVER__BASE_LR=1e-3, SOLVER__BACKBONE_MULTIPLIER=0.5,
                    SOLVER__LR_SCHEDULER_NAME="WarmupPolyLR")
    trainer = SwapTrainer(cfg)
    probe = LRProbe()
    trainer.register_hooks([probe])
    trainer.resume_or_load(resume=False)
    trainer.train()
    backbone = backbone_groups(trainer)
    for start in (0, 3):
        lrs = [probe.steps[start + i][1] for i in range(3)]
        assert lrs[0] == [5e-4 if b else 1e-3 for b in backbone]
        assert lrs[0][0] > lrs[1][0] > lrs[2][0] > 0  # poly decay within the phase
    assert trainer.cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"


def test_lora_counts_and_swap_lines_show_under_mask2former_logging(tmp_path, d2_logs):
    trainer = SwapTrainer(users_cfg(tmp_path))
    trainer.resume_or_load(resume=False)
    trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    log = d2_logs.read_text()
    # Swin MLPs (3 blocks), pixel-decoder encoder (2 layers), transformer decoder (3 layers): 2 linears each.
    assert (f"Swap: LoRA rank 8 on 16 linear layers in 8 groups, {trainable} trainable parameters of {total}; "
            "sem_seg_head.predictor.class_embed grown from 6 to 8 outputs") in log
    assert log.count("Swap: LoRA rank") == 1
    assert "Swap: phase 0_learn (3 iterations" in log and "Swap: phase 1_forget (3 iterations" in log
    assert "Swap report:" in log


def test_a_checkpoint_head_of_another_size_names_the_pretrained_size(tmp_path):
    other = glyph_cfg(str(tmp_path), num_classes=6)
    DetectionCheckpointer(build_model(other), str(tmp_path)).save("six_classes")
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), tmp_path / "six_classes.pth")
    trainer = make_trainer_classes()[1](cfg)
    with pytest.raises(CheckpointMismatchError) as err:
        trainer.resume_or_load(resume=False)
    assert "The checkpoint's sem_seg_head.predictor.weight has 6 rows, but the pretrained label space has 5 " \
           "classes (5 rows)" in str(err.value)
    assert "7" not in str(err.value)  # the grown head's size means nothing to the user



class VersionedHead(torch.nn.Module):
    """As Mask2Former's ``MaskFormerHead``: a state dict older than format version 2 gets its pixel-decoder keys
    renamed (``sem_seg_head.X`` to ``sem_seg_head.pixel_decoder.X``) when loaded."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args) -> None:
        if (local_metadata.get("version") or 0) < 2:
            for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "predictor")]:
                state_dict[key.replace(prefix, prefix + "pixel_decoder.", 1)] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)


@META_ARCH_REGISTRY.register()
class VersionedMiniMask2Former(MiniMask2Former):
    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.sem_seg_head.__class__ = VersionedHead


def test_the_checkpoint_format_version_reaches_the_model(tmp_path):
    cfg = users_cfg(tmp_path)
    cfg.MODEL.META_ARCHITECTURE = "VersionedMiniMask2Former"
    DetectionCheckpointer(build_model(cfg), str(tmp_path)).save("versioned")  # torch records the head's version
    cfg.MODEL.WEIGHTS = str(tmp_path / "versioned.pth")
    trainer = SwapTrainer(cfg)
    trainer.resume_or_load(resume=False)
    saved = torch.load(tmp_path / "versioned.pth", weights_only=True)["model"]
    loaded = to_plain_keys(trainer.model.state_dict(), trainer.model)
    decoder = [k for k in saved if k.startswith("sem_seg_head.pixel_decoder.")]
    assert decoder and all(torch.equal(loaded[k], saved[k]) for k in decoder)

    # Without the version the head renames those keys and takes none of them: refused, not half-loaded.
    state = OrderedDict(saved)  # no _metadata
    torch.save({"model": state}, tmp_path / "unversioned.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "unversioned.pth")
    with pytest.raises(CheckpointMismatchError, match="did not take .* sem_seg_head.pixel_decoder"):
        SwapTrainer(cfg).resume_or_load(resume=False)


def test_solver_overrides_leave_configs_without_a_backbone_multiplier_alone(tmp_path):
    cfg = glyph_cfg(str(tmp_path))  # detectron2's own SOLVER keys: no BACKBONE_MULTIPLIER
    assert solver_overrides(cfg) == {"SOLVER.BASE_LR": 1e-4, "SOLVER.AMP.ENABLED": False}
    cfg.SWAP.SOLVER.BASE_LR = 0.0
    with pytest.raises(SwapConfigError, match="SWAP.SOLVER.BASE_LR must be > 0"):
        solver_overrides(cfg)
