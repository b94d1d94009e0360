"""Route mmcv's PyTorch path of multi-scale deformable attention (used on CPU) to kswap's kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from mmcv.ops import multi_scale_deform_attn as mmcv_msda

from kswap.ops import ms_deform_attn

_MMCV_PYTORCH = mmcv_msda.multi_scale_deformable_attn_pytorch


def kswap_multi_scale_deformable_attn(
    value: torch.Tensor, value_spatial_shapes: torch.Tensor, sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """mmcv's ``multi_scale_deformable_attn_pytorch`` signature, computed by ``kswap.ops.ms_deform_attn``."""
    sizes = value_spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return ms_deform_attn(value, value_spatial_shapes, level_start_index, sampling_locations, attention_weights)


def route_msda_to_kswap(enabled: bool = True) -> None:
    """Point mmcv's ``MultiScaleDeformableAttention`` CPU path at kswap's kernel (or back at mmcv's own).

    mmcv calls its CUDA op for CUDA tensors and ``multi_scale_deformable_attn_pytorch`` otherwise; only the
    latter is replaced.
    """
    mmcv_msda.multi_scale_deformable_attn_pytorch = kswap_multi_scale_deformable_attn if enabled else _MMCV_PYTORCH


@contextlib.contextmanager
def msda_routed_to_kswap() -> Iterator[None]:
    """mmcv's CPU path on kswap's kernel inside the block (a ``SwapHook`` run), as it was before after it."""
    previous = mmcv_msda.multi_scale_deformable_attn_pytorch
    route_msda_to_kswap(True)
    try:
        yield
    finally:
        mmcv_msda.multi_scale_deformable_attn_pytorch = previous
