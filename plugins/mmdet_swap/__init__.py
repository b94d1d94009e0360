"""mmdet_swap: knowledge swapping for mmdet 3.x DETR-style detectors (DINO), enabled from the config.

    custom_imports = dict(imports=['mmdet_swap'], allow_failed_imports=False)
    custom_hooks = [dict(type='SwapHook', forget=dict(classes=(...)), learn=dict(classes=(...), train=..., val=...))]

Importing it registers ``SwapHook`` and ``SwapCocoDataset``, lets mmengine load its own local checkpoints
under torch >= 2.6 (``weights_only`` with mmengine's types allowed), and routes mmcv's CPU path of
``MultiScaleDeformableAttention`` to kswap's compiled kernel (``route_msda_to_kswap(False)`` restores mmcv's).
"""

from .checkpoint import load_local_checkpoint, register_checkpoint_loader
from .datasets import SwapCocoDataset
from .hook import SwapHook
from .msda import route_msda_to_kswap
from .sampler import SwapSampler

register_checkpoint_loader()
route_msda_to_kswap(True)

__all__ = ["SwapCocoDataset", "SwapHook", "SwapSampler", "load_local_checkpoint", "route_msda_to_kswap"]
