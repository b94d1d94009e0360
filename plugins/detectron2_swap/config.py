"""``add_swap_config``: the ``SWAP`` block of a detectron2 (yacs) config, and its reading into a ``SwapConfig``.

    cfg = get_cfg(); add_maskformer2_config(cfg); add_swap_config(cfg); cfg.merge_from_file("swap.yaml")

Every ``SwapConfig`` setting is ``SWAP.<field.cfg_key>`` of ``kswap.config_fields()``, named as in the other hosts
(``SWAP.FORGET``, ``SWAP.LEARN_LENGTH: 3500steps``, ``SWAP.FORGET_LOSS.BND``, ``SWAP.LORA.RANK``, ...; ``field.help``
describes it), with the reference segmentation preset's defaults (Mask2Former on ADE20K): bnd 115, beta 0.2,
alpha 0.01, learn weight 0.9, phases of 3500 iterations, a fresh optimizer and LR schedule per phase, LoRA rank 8
on the Mask2Former FFNs. The other keys are detectron2's: datasets, batch, head, ``SWAP.SOLVER`` (a constant LR
1e-4 in fp32, backbone included) and ``SWAP.AUDIT``. With ``SWAP.ENABLED: False`` (the default) nothing changes.
"""

from __future__ import annotations

from dataclasses import fields
from functools import reduce
from typing import Any

from detectron2.config import CfgNode as CN

from kswap import (
    PERIODIC_SCORE_IMAGES,
    AuditSettings,
    ConfigField,
    PhaseLength,
    SwapConfig,
    SwapConfigError,
    config_fields,
    config_from_fields,
)

# cfg.SWAP.SOLVER.LR_SCHEDULER_NAME of the reference's constant LR (detectron2 has no scheduler of that name).
CONSTANT_LR = "Constant"


# Keys of detectron2_swap before it named the settings as kswap does: a YAML or opts naming one fails with the new
# key. A renamed node stands for its leaves too (SWAP.LOSS.FORGET.BND -> SWAP.FORGET_LOSS.BND).
RENAMED_KEYS = {
    "SWAP.FORGET_CLASSES": "SWAP.FORGET",
    "SWAP.RETAIN_CLASSES": "SWAP.RETAIN",
    "SWAP.LEARN_CLASSES": "SWAP.LEARN",
    "SWAP.LEARN_ITERS": "SWAP.LEARN_LENGTH",
    "SWAP.FORGET_ITERS": "SWAP.FORGET_LENGTH",
    "SWAP.RESET_OPTIMIZER": "SWAP.RESET_OPTIMIZER_BETWEEN_PHASES",
    "SWAP.LOSS": "SWAP.LEARN_LOSS and SWAP.FORGET_LOSS",
    "SWAP.LOSS.LEARN": "SWAP.LEARN_LOSS",
    "SWAP.LOSS.FORGET": "SWAP.FORGET_LOSS",
}
RENAMED_NOTE = "The SWAP keys are kswap's setting names (kswap.config_fields()); a phase length reads e.g. 3500steps."


def add_swap_config(cfg: CN) -> None:
    """Add the ``SWAP`` node with its defaults to ``cfg`` (call it before ``merge_from_file``)."""
    cfg.SWAP = CN()
    cfg.SWAP.ENABLED = False
    preset = SwapConfig.preset("segmentation", forget=("forget",), learn=("learn",))  # placeholder sets
    for field in config_fields():
        *parents, leaf = field.cfg_key.split(".")
        node = reduce(lambda n, part: n.setdefault(part, CN()), parents, cfg.SWAP)
        node[leaf] = _default(field, preset)
    for old, new in _renamed_keys().items():
        cfg.register_renamed_key(old, new, RENAMED_NOTE)
    # Registered DatasetCatalog names per set: training sets, and the sets scored for the swap report.
    cfg.SWAP.DATASETS = CN()
    for name in ("FORGET", "RETAIN", "LEARN"):
        cfg.SWAP.DATASETS[name] = ()
        cfg.SWAP.DATASETS[f"{name}_TEST"] = ()
    # Images per loss role per step, over all processes (0: SOLVER.IMS_PER_BATCH).
    cfg.SWAP.IMS_PER_BATCH = 0
    # 0: a phase starts from the previous phase's final weights. N > 0 reproduces the reference, whose next phase
    # started from the weights saved at iteration N (3000) of the previous one.
    cfg.SWAP.CHAIN_FROM_ITER = 0
    # Score the three sets every N iterations (0: only before the swap and at phase ends), each on a seeded
    # subsample of at most EVAL_IMAGES of its test images. Before the swap and at phase ends: the whole sets.
    # Off by default, as in the other hosts: with Mask2Former R50 and 500 test images per set, every 500
    # iterations on 200 images would take scoring from 7.5 % to 17 % of the run (bench/scoring_cost.py).
    cfg.SWAP.EVAL_PERIOD = 0
    cfg.SWAP.EVAL_IMAGES = PERIODIC_SCORE_IMAGES

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
    for key in ("FORGET", "LEARN"):
        if not cfg.SWAP[key]:
            raise SwapConfigError(f"cfg.SWAP.{key} is empty: list the class names to {key.lower()} (as in the "
                                  "datasets' stuff_classes).")
    return config_from_fields("segmentation", {
        field: _from_cfg(field, reduce(lambda n, part: n[part], field.cfg_key.split("."), cfg.SWAP))
        for field in config_fields()})


def _default(field: ConfigField, preset: SwapConfig) -> Any:
    """The yacs default of ``field``: the preset's value, [] for a class set (yacs has no None and no enums)."""
    if field.kind == "classes":
        return []
    value = field.get(preset)
    if field.kind == "length":
        return str(value)
    if field.kind == "order":
        return value.value
    return "" if value is None else value


def _from_cfg(field: ConfigField, value: Any) -> Any:
    """A yacs value of ``cfg.SWAP`` as the ``SwapConfig`` one: empty sets and strings are None."""
    if field.kind == "length":
        try:
            steps = PhaseLength.parse(value).steps
        except SwapConfigError:
            steps = None
        if steps is None:
            raise SwapConfigError(f"cfg.SWAP.{field.cfg_key}={value!r} is not a number of iterations: detectron2's "
                                  "data loaders are infinite, so a phase has no epochs; write e.g. 3500steps.")
    if field.kind == "classes":
        return tuple(value) or None
    return None if value == "" else value


def _renamed_keys() -> dict[str, str]:
    """``RENAMED_KEYS`` with the leaves of its renamed nodes (opts name a leaf: ``SWAP.LOSS.FORGET.BND``)."""
    keys = [f"SWAP.{field.cfg_key}" for field in config_fields()]
    leaves = {old + key[len(new):]: key
              for old, new in RENAMED_KEYS.items() for key in keys if key.startswith(new + ".")}
    return {**RENAMED_KEYS, **leaves}
