"""The kswap kernel inside detectron2: the ``MultiScaleDeformableAttention`` module Mask2Former imports."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from kswap.ops import ms_deform_attn_reference

from swap_testing.msda_inputs import make_inputs


class Mask2FormerStyleFunction(torch.autograd.Function):
    """Calls the extension exactly as Mask2Former's ``MSDeformAttnFunction`` does (positional arguments,
    ``im2col_step`` last, backward returning three gradients)."""

    @staticmethod
    def forward(ctx, value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
                im2col_step):
        import MultiScaleDeformableAttention as MSDA

        ctx.im2col_step = im2col_step
        output = MSDA.ms_deform_attn_forward(value, value_spatial_shapes, value_level_start_index,
                                             sampling_locations, attention_weights, ctx.im2col_step)
        ctx.save_for_backward(value, value_spatial_shapes, value_level_start_index, sampling_locations,
                              attention_weights)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        import MultiScaleDeformableAttention as MSDA

        value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_sampling_loc, grad_attn_weight = MSDA.ms_deform_attn_backward(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights,
            grad_output.contiguous(), ctx.im2col_step)
        return grad_value, None, None, grad_sampling_loc, grad_attn_weight, None


@pytest.fixture
def fallback_module():
    from detectron2_swap import enable_msda_fallback

    saved = sys.modules.pop("MultiScaleDeformableAttention", None)
    module = enable_msda_fallback()
    yield module
    sys.modules.pop("MultiScaleDeformableAttention", None)
    if saved is not None:
        sys.modules["MultiScaleDeformableAttention"] = saved


@pytest.mark.parametrize("compiled", [True, False])
def test_mask2former_interface(fallback_module, compiled, monkeypatch):
    from detectron2_swap import msda

    assert importlib.import_module("MultiScaleDeformableAttention") is msda
    if not compiled:
        monkeypatch.setattr(msda, "compiled_available", lambda device: False)
        monkeypatch.setattr("kswap.ops.deform_attn.compiled_available", lambda device: False)
    inputs = make_inputs(n=2, heads=2, channels=4, queries=5)

    def grads(fn):
        value, shapes, starts, loc, attn = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(value, shapes, starts, loc, attn)
        out.backward(torch.ones_like(out))
        return out.detach(), value.grad, loc.grad, attn.grad

    ours = grads(lambda *a: Mask2FormerStyleFunction.apply(*a, 64))
    ref = grads(ms_deform_attn_reference)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_fallback_leaves_a_real_build_alone(fallback_module):
    from detectron2_swap import enable_msda_fallback

    real = type(sys)("MultiScaleDeformableAttention")
    sys.modules["MultiScaleDeformableAttention"] = real
    assert enable_msda_fallback() is real
    assert enable_msda_fallback(force=True) is not real
