"""detectron2_swap: knowledge swapping for detectron2 models (Mask2Former and any meta-architecture with a loss dict).

In the user's ``train_net.py``::

    from detectron2_swap import SwapTrainerMixin, add_swap_config

    class Trainer(SwapTrainerMixin, Trainer):  # one line; the user's Trainer keeps its own logic
        pass

    def setup(args):
        cfg = get_cfg(); add_maskformer2_config(cfg); add_swap_config(cfg); cfg.merge_from_file(args.config_file)

and a ``SWAP:`` block in the YAML (``ENABLED: True``, class names, ``DATASETS``, ...). The pieces (``SwapPlan``,
``prepare_swap_model``, ``SwapDataLoader``, ``SwapHook``, ``SwapCheckpointer``, ``SetScorer``, ``score_sets``,
``SegmentationAudit``) also compose without the mixin, e.g. from a LazyConfig training script.
``enable_msda_fallback()`` lets Mask2Former run where its CUDA op was never built.
"""

from kswap import ROLE_KEY

from .audit import SegmentationAudit
from .checkpoint import SwapCheckpointer
from .config import add_swap_config, audit_settings_from_cfg, swap_config_from_cfg
from .data import DetectionRoleLoader, SwapDataLoader, remap_sample
from .evaluation import SetScorer, SetSemSegEvaluator, per_class_iou, score_sets
from .hook import SwapHook
from .model import SwapModelMixin, extend_classes, find_class_head, prepare_swap_model
from .msda import enable_msda_fallback
from .plan import SwapPlan, label_table
from .trainer import SwapTrainerMixin, write_swapped_config

__all__ = [
    "DetectionRoleLoader", "ROLE_KEY", "SegmentationAudit", "SetScorer", "SetSemSegEvaluator", "SwapCheckpointer",
    "SwapDataLoader", "SwapHook", "SwapModelMixin", "SwapPlan", "SwapTrainerMixin", "add_swap_config",
    "audit_settings_from_cfg", "enable_msda_fallback", "extend_classes", "find_class_head", "label_table",
    "per_class_iou", "prepare_swap_model", "remap_sample", "score_sets", "swap_config_from_cfg",
    "write_swapped_config",
]
