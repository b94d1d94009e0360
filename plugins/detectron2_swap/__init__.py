"""detectron2_swap: knowledge swapping for detectron2 models (Mask2Former and others).

Available now: ``enable_msda_fallback()``, a stand-in for Mask2Former's compiled ``MultiScaleDeformableAttention``
module backed by kswap's op, so Mask2Former runs where its CUDA op was never built.
"""

from .msda import enable_msda_fallback

__all__ = ["enable_msda_fallback"]
