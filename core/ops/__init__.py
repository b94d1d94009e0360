"""Compiled ops with a pure-PyTorch reference: multi-scale deformable attention.

``python -m kswap.ops`` prints which kernel serves (prebuilt, built on first use, or the reference).
"""

from .deform_attn import compiled_available, ms_deform_attn, ms_deform_attn_reference
from .extension import KernelInfo, kernel_info

__all__ = ["KernelInfo", "compiled_available", "kernel_info", "ms_deform_attn", "ms_deform_attn_reference"]
