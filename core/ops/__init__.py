"""Compiled ops with a pure-PyTorch reference: multi-scale deformable attention."""

from .deform_attn import compiled_available, ms_deform_attn, ms_deform_attn_reference

__all__ = ["compiled_available", "ms_deform_attn", "ms_deform_attn_reference"]
