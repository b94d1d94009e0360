"""mmdet_swap: knowledge swapping for mmdet 3.x DETR-style detectors (DINO), enabled from the config.

    custom_imports = dict(imports=['mmdet_swap'], allow_failed_imports=False)
    custom_hooks = [dict(type='SwapHook', forget=dict(classes=(...)), learn=dict(classes=(...), train=..., val=...))]

Importing it registers ``SwapHook`` and ``SwapCocoDataset`` and routes mmcv's CPU path of
``MultiScaleDeformableAttention`` to kswap's compiled kernel (``route_msda_to_kswap(False)`` restores mmcv's).
"""

from .datasets import SwapCocoDataset
from .hook import SwapHook
from .msda import route_msda_to_kswap

route_msda_to_kswap(True)

__all__ = ["SwapCocoDataset", "SwapHook", "route_msda_to_kswap"]
