"""``add_swap_config``: the ``SWAP`` block of a detectron2 (yacs) config, and its reading into a ``SwapConfig``.

    cfg = get_cfg(); add_maskformer2_config(cfg); add_swap_config(cfg); cfg.merge_from_file("swap.yaml")

Defaults are the reference segmentation preset (Mask2Former on ADE20K): bnd 115, beta 0.2, alpha 0.01, learn
weight 0.9, phases of 3500 iterations, a fresh optimizer and LR schedule per phase at a constant LR 1e-4 in fp32,
backbone included (``SWAP.SOLVER``), LoRA rank 8 on the Mask2Former FFNs. With ``SWAP.ENABLED: False`` (the
default) nothing changes.
"""

from __future__ import annotations

from dataclasses import fields

from detectron2.config import CfgNode as CN

from kswap import PRESETS, AuditSettings, LoraSettings, LossWeights, PhaseLength, SwapConfig, SwapConfigError

# cfg.SWAP.SOLVER.LR_SCHEDULER_NAME of the reference's constant LR (detectron2 has no scheduler of that name).
CONSTANT_LR = "Constant"


def add_swap_config(cfg: CN) -> None:
    """Add the ``SWAP`` node with its defaults to ``cfg`` (call it before ``merge_from_file``)."""
    preset = PRESETS["segmentation"]
    learn, forget, lora = preset["learn_loss"], preset["forget_loss"], preset["lora"]
    cfg.SWAP = CN()
    cfg.SWAP.ENABLED = False
    # learn_then_forget (recommended), forget_then_learn, learn_forget_learn, forget_learn_forget or joint.
    cfg.SWAP.ORDER = "learn_then_forget"
    # Class names as in the datasets' metadata ``stuff_classes``. FORGET and RETAIN name pretrained classes (the
    # classes of DATASETS.TRAIN[0], the set the model was trained on); an empty RETAIN keeps every other class.
    cfg.SWAP.FORGET_CLASSES = []
    cfg.SWAP.RETAIN_CLASSES = []
    cfg.SWAP.LEARN_CLASSES = []
    # Registered DatasetCatalog names per set: training sets, and the sets scored for the swap report.
    cfg.SWAP.DATASETS = CN()
    for name in ("FORGET", "RETAIN", "LEARN"):
        cfg.SWAP.DATASETS[name] = ()
        cfg.SWAP.DATASETS[f"{name}_TEST"] = ()
    cfg.SWAP.LEARN_ITERS = preset["learn_length"].steps
    cfg.SWAP.FORGET_ITERS = preset["forget_length"].steps
    # Images per loss role per step, over all processes (0: SOLVER.IMS_PER_BATCH).
    cfg.SWAP.IMS_PER_BATCH = 0
    cfg.SWAP.FORGET_RETAINS_LEARNED = True
    cfg.SWAP.RESET_OPTIMIZER = preset["reset_optimizer_between_phases"]
    cfg.SWAP.RESTART_LR_SCHEDULE = preset["restart_lr_schedule"]
    # 0: a phase starts from the previous phase's final weights. N > 0 reproduces the reference, whose next phase
    # started from the weights saved at iteration N (3000) of the previous one.
    cfg.SWAP.CHAIN_FROM_ITER = 0
    # Score the three sets every N iterations (0: only before the swap and at phase ends).
    cfg.SWAP.EVAL_PERIOD = 500

    cfg.SWAP.LORA = CN()
    cfg.SWAP.LORA.RANK = lora.rank
    cfg.SWAP.LORA.SCALING = lora.scaling
    # A preset name (mask2former, ffn, timm_vit, mmdet_dino) or a regex fully matching linear-layer names.
    cfg.SWAP.LORA.TARGETS = lora.targets
    cfg.SWAP.LORA.DROPOUT = lora.dropout
    # A regex whose match at the start of a module name is its group ("": one group per block, discovered).
    cfg.SWAP.LORA.GROUP_BY = ""
    cfg.SWAP.LORA.REFERENCE_INIT = lora.reference_init

    cfg.SWAP.LOSS = CN()
    cfg.SWAP.LOSS.LEARN = CN()
    cfg.SWAP.LOSS.LEARN.RETAIN_WEIGHT = learn.retain_weight
    cfg.SWAP.LOSS.LEARN.LEARN_WEIGHT = learn.learn_weight
    cfg.SWAP.LOSS.LEARN.ALPHA = learn.alpha
    cfg.SWAP.LOSS.FORGET = CN()
    cfg.SWAP.LOSS.FORGET.RETAIN_WEIGHT = forget.retain_weight
    cfg.SWAP.LOSS.FORGET.BETA = forget.beta
    cfg.SWAP.LOSS.FORGET.BND = forget.bnd
    # True: BND is a multiple of the forget loss measured at the forget phase's first step (e.g. 3), not absolute.
    cfg.SWAP.LOSS.FORGET.BND_RELATIVE = forget.bnd_relative
    cfg.SWAP.LOSS.FORGET.ALPHA = forget.alpha

    # The classifier that grows by the new classes ("": Mask2Former's sem_seg_head.predictor.class_embed, else
    # a SemanticSegmentor's sem_seg_head.predictor) and its trailing rows kept last (-1: 1 for Mask2Former's
    # "no object" row, 0 otherwise).
    cfg.SWAP.HEAD = CN()
    cfg.SWAP.HEAD.NAME = ""
    cfg.SWAP.HEAD.TRAILING_ROWS = -1

    # The swap's optimisation, which replaces the pretraining's SOLVER values while SWAP.ENABLED (the reference:
    # a constant LR 1e-4 in fp32, the backbone LoRA at the full LR). The user's build_optimizer and
    # build_lr_scheduler read these through cfg.SOLVER; the other SOLVER keys (optimizer type, weight decay,
    # gradient clipping) stay the user's.
    cfg.SWAP.SOLVER = CN()
    cfg.SWAP.SOLVER.BASE_LR = 1e-4
    # "Constant": the LR stays at BASE_LR. Any other name (e.g. "WarmupPolyLR") becomes SOLVER.LR_SCHEDULER_NAME
    # for the user's build_lr_scheduler, over each phase's iterations (restarted per phase, RESTART_LR_SCHEDULE).
    cfg.SWAP.SOLVER.LR_SCHEDULER_NAME = CONSTANT_LR
    cfg.SWAP.SOLVER.AMP = False
    # Mask2Former's SOLVER.BACKBONE_MULTIPLIER (pretraining: 0.1); set only where the config has that key.
    cfg.SWAP.SOLVER.BACKBONE_MULTIPLIER = 1.0

    # The unlearning audit after the swap (``audit.py``): linear probes on mask-pooled features, a relearn attack
    # and the neighbour mass, for the pretrained and the swapped model. The other keys are kswap.AuditSettings'
    # fields, upper-cased, with its defaults (RELEARN_SHOTS 5, RELEARN_STEPS 50, RELEARN_LR 1e-4, ...).
    cfg.SWAP.AUDIT = CN()
    cfg.SWAP.AUDIT.ENABLED = False
    for field in fields(AuditSettings):
        cfg.SWAP.AUDIT[field.name.upper()] = field.default
    # The module whose first 4-D input is the per-pixel feature map the probes pool ("": sem_seg_head.predictor,
    # i.e. Mask2Former's pixel-decoder mask features or a SemanticSegmentor head's last features).
    cfg.SWAP.AUDIT.FEATURES = ""
    # The probes see at most this many images of each forget / retain dataset (a seeded draw).
    cfg.SWAP.AUDIT.PROBE_IMAGES = 500


def solver_overrides(cfg: CN) -> dict[str, object]:
    """The ``SOLVER`` values a swap trains with, from ``cfg.SWAP.SOLVER``, as ``{"SOLVER.BASE_LR": 1e-4, ...}``."""
    s = cfg.SWAP.SOLVER
    if not s.BASE_LR > 0:
        raise SwapConfigError(f"cfg.SWAP.SOLVER.BASE_LR must be > 0, got {s.BASE_LR!r} (reference: 1e-4).")
    values: dict[str, object] = {"SOLVER.BASE_LR": s.BASE_LR, "SOLVER.AMP.ENABLED": s.AMP}
    if s.LR_SCHEDULER_NAME != CONSTANT_LR:
        values["SOLVER.LR_SCHEDULER_NAME"] = s.LR_SCHEDULER_NAME
    if "BACKBONE_MULTIPLIER" in cfg.SOLVER:
        values["SOLVER.BACKBONE_MULTIPLIER"] = s.BACKBONE_MULTIPLIER
    return values


def audit_settings_from_cfg(cfg: CN) -> AuditSettings:
    """The ``AuditSettings`` of ``cfg.SWAP.AUDIT``; raises ``SwapConfigError`` naming a key out of range."""
    a = cfg.SWAP.AUDIT
    settings = AuditSettings(**{f.name: a[f.name.upper()] for f in fields(AuditSettings)})
    for key in ("PROBE_STEPS", "RELEARN_SHOTS", "PROBE_IMAGES", "NEIGHBOURS"):
        if not a[key] >= 1:
            raise SwapConfigError(f"cfg.SWAP.AUDIT.{key} must be >= 1, got {a[key]!r}.")
    if not (a.RELEARN_STEPS >= 0 and a.RELEARN_LR > 0):
        raise SwapConfigError(f"cfg.SWAP.AUDIT.RELEARN_STEPS must be >= 0 and RELEARN_LR > 0, got "
                              f"{a.RELEARN_STEPS!r} and {a.RELEARN_LR!r}.")
    return settings


def swap_config_from_cfg(cfg: CN) -> SwapConfig:
    """The framework-free ``SwapConfig`` of ``cfg.SWAP``; raises ``SwapConfigError`` naming the key to fix."""
    if "SWAP" not in cfg:
        raise SwapConfigError("The config has no SWAP node: call detectron2_swap.add_swap_config(cfg) in setup().")
    s = cfg.SWAP
    for key in ("FORGET_CLASSES", "LEARN_CLASSES"):
        if not s[key]:
            raise SwapConfigError(f"cfg.SWAP.{key} is empty: list the class names to "
                                  f"{key.split('_')[0].lower()} (as in the datasets' stuff_classes).")
    for key in ("LEARN_ITERS", "FORGET_ITERS"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise SwapConfigError(f"cfg.SWAP.{key} must be a positive number of iterations, got {s[key]!r}.")
    base = PRESETS["segmentation"]
    return SwapConfig.preset(
        "segmentation",
        forget=tuple(s.FORGET_CLASSES),
        retain=tuple(s.RETAIN_CLASSES) or None,
        learn=tuple(s.LEARN_CLASSES),
        order=s.ORDER,
        learn_length=PhaseLength(steps=s.LEARN_ITERS),
        forget_length=PhaseLength(steps=s.FORGET_ITERS),
        learn_loss=LossWeights(retain_weight=s.LOSS.LEARN.RETAIN_WEIGHT, learn_weight=s.LOSS.LEARN.LEARN_WEIGHT,
                               alpha=s.LOSS.LEARN.ALPHA, beta=base["learn_loss"].beta, bnd=base["learn_loss"].bnd),
        forget_loss=LossWeights(retain_weight=s.LOSS.FORGET.RETAIN_WEIGHT, beta=s.LOSS.FORGET.BETA,
                                bnd=s.LOSS.FORGET.BND, alpha=s.LOSS.FORGET.ALPHA,
                                bnd_relative=s.LOSS.FORGET.BND_RELATIVE),
        lora=LoraSettings(rank=s.LORA.RANK, scaling=s.LORA.SCALING, targets=s.LORA.TARGETS, dropout=s.LORA.DROPOUT,
                          group_by=s.LORA.GROUP_BY or None, reference_init=s.LORA.REFERENCE_INIT),
        forget_retains_learned=s.FORGET_RETAINS_LEARNED,
        reset_optimizer_between_phases=s.RESET_OPTIMIZER,
        restart_lr_schedule=s.RESTART_LR_SCHEDULE,
    )
