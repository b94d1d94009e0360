"""A stand-in for Mask2Former's compiled ``MultiScaleDeformableAttention`` extension, backed by kswap's op.

Mask2Former's ``ms_deform_attn_func.py`` does ``import MultiScaleDeformableAttention as MSDA`` and raises at
import time when that extension was never built (it needs CUDA and a compiler). After
``enable_msda_fallback()``, the import finds this module instead; it has the two functions Mask2Former calls,
with the same arguments (``im2col_step`` is accepted and not needed), on CPU and GPU.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

from kswap.ops import compiled_available, ms_deform_attn, ms_deform_attn_reference

MODULE_NAME = "MultiScaleDeformableAttention"


def ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, im2col_step):
    """``(N, Lq, M·D)`` output, as the compiled ``ms_deform_attn_forward``."""
    with torch.no_grad():
        return ms_deform_attn(value, spatial_shapes, level_start_index, sampling_loc, attn_weight)


def ms_deform_attn_backward(value, spatial_shapes, level_start_index, sampling_loc, attn_weight, grad_output,
                            im2col_step):
    """``[grad_value, grad_sampling_loc, grad_attn_weight]``, as the compiled ``ms_deform_attn_backward``."""
    if compiled_available(value.device) and value.dtype in (torch.float32, torch.float64):
        from kswap import _C

        return _C.ms_deform_attn_backward(value.contiguous(), spatial_shapes.contiguous(),
                                          level_start_index.contiguous(), sampling_loc.contiguous(),
                                          attn_weight.contiguous(), grad_output.contiguous())
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (value, sampling_loc, attn_weight)]
        out = ms_deform_attn_reference(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
        return list(torch.autograd.grad(out, inputs, grad_output))


def enable_msda_fallback(force: bool = False) -> ModuleType:
    """Make ``import MultiScaleDeformableAttention`` resolve to this module.

    Args:
        force: replace a compiled ``MultiScaleDeformableAttention`` that is installed; by default a real build
            is left alone.

    Returns:
        The module ``import MultiScaleDeformableAttention`` now gives.
    """
    if not force:
        if MODULE_NAME in sys.modules:
            return sys.modules[MODULE_NAME]
        if importlib.util.find_spec(MODULE_NAME) is not None:
            return importlib.import_module(MODULE_NAME)
    sys.modules[MODULE_NAME] = sys.modules[__name__]
    return sys.modules[__name__]
