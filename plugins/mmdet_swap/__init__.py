"""mmdet_swap: knowledge swapping for mmdet 3.x DETR-style detectors (DINO), enabled from the config.

    custom_imports = dict(imports=['mmdet_swap'], allow_failed_imports=False)
    custom_hooks = [dict(type='SwapHook', forget=dict(classes=(...)), learn=dict(classes=(...), train=..., val=...))]

Importing it registers ``SwapHook``, ``SwapTrainLoop``, ``SwapCocoDataset`` and ``SwapSampler`` and changes
nothing else. A ``SwapHook`` run, from its start to its end, lets mmengine load its own local checkpoints under
torch >= 2.6 (``local_checkpoint_loader``: ``weights_only`` with mmengine's types allowed) and routes mmcv's CPU
path of ``MultiScaleDeformableAttention`` to kswap's compiled kernel (``msda_routed_to_kswap``); both are
context managers for use outside a run, and ``route_msda_to_kswap(enabled)`` switches the kernel for good.
"""

from .checkpoint import load_local_checkpoint, local_checkpoint_loader
from .datasets import SwapCocoDataset
from .hook import SwapHook
from .loop import SwapTrainLoop
from .msda import msda_routed_to_kswap, route_msda_to_kswap
from .sampler import SwapSampler

__all__ = ["SwapCocoDataset", "SwapHook", "SwapSampler", "SwapTrainLoop", "load_local_checkpoint",
           "local_checkpoint_loader", "msda_routed_to_kswap", "route_msda_to_kswap"]
