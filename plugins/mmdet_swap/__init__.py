"""mmdet_swap: knowledge swapping for mmdet 3.x detectors (DINO), enabled from the config.

Available now: importing it routes mmcv's CPU path of ``MultiScaleDeformableAttention`` (a ``grid_sample``
composition) to kswap's compiled kernel; ``route_msda_to_kswap(False)`` restores mmcv's own.
"""

from .msda import route_msda_to_kswap

route_msda_to_kswap(True)

__all__ = ["route_msda_to_kswap"]
