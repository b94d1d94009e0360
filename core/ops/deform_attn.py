"""Multi-scale deformable attention (Deformable DETR, DINO, Mask2Former's pixel decoder).

``ms_deform_attn`` runs the compiled kernel (``kswap._C``, or the same sources built on first use; CPU, and CUDA
when built with it) and falls back to ``ms_deform_attn_reference`` (``grid_sample``, differentiable by autograd)
when neither is available, saying so once. Both take the op contract of the reference implementations:

- value ``(N, S, M, D)``, ``S = Σ_l H_l·W_l``;
- spatial_shapes ``(L, 2)`` int64 ``(H_l, W_l)``; level_start_index ``(L,)`` int64;
- sampling_locations ``(N, Lq, M, L, P, 2)``, normalised ``(x, y)`` in ``[0, 1]``;
- attention_weights ``(N, Lq, M, L, P)``, already normalised;
- output ``(N, Lq, M·D)``; bilinear sampling with zero padding, ``grid_sample(align_corners=False)``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from .extension import extension

_KERNEL_DTYPES = (torch.float32, torch.float64)


def compiled_available(device: torch.device | str = "cpu") -> bool:
    """Whether the compiled kernel serves tensors on ``device``."""
    ext = extension()
    if ext is None:
        return False
    return torch.device(device).type == "cpu" or (torch.device(device).type == "cuda" and ext.with_cuda())


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The ``grid_sample`` composition: per level, sample every head's map at its points; weight and sum."""
    n, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        start = int(level_start_index[level])
        v = value[:, start : start + sizes[level]]  # (N, H*W, M, D)
        v = v.permute(0, 2, 3, 1).reshape(n * heads, channels, int(h), int(w))
        g = grids[:, :, :, level].transpose(1, 2).reshape(n * heads, queries, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (N*M, D, Lq)
    return out.view(n, heads * channels, queries).transpose(1, 2).contiguous()


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return extension().ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_loc, grad_attn = extension().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
        )
        return grad_value, None, None, grad_loc, grad_attn


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be (N, S, M, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got {tuple(sampling_locations.shape)}"
        )
    n, s, m, _ = value.shape
    levels = sampling_locations.shape[3]
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise ValueError(
            f"ms_deform_attn: spatial_shapes {tuple(spatial_shapes.shape)} and level_start_index "
            f"{tuple(level_start_index.shape)} must be (L, 2) and (L,) with L = {levels}"
        )
    if sampling_locations.shape[0] != n or sampling_locations.shape[2] != m:
        raise ValueError(
            f"ms_deform_attn: sampling_locations {tuple(sampling_locations.shape)} does not match value "
            f"{tuple(value.shape)} (batch and heads)"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be {tuple(sampling_locations.shape[:-1])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum()) != s:
        raise ValueError(f"ms_deform_attn: spatial_shapes {spatial_shapes.tolist()} do not cover S = {s}")


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention; the compiled kernel when available, else the reference.

    Non-contiguous inputs are made contiguous. Half and bfloat16 inputs are computed in float32 and cast
    back, as the DINO module does.
    """
    _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not compiled_available(value.device):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    dtype = value.dtype
    compute = dtype if dtype in _KERNEL_DTYPES else torch.float32
    out = _MSDeformAttnFunction.apply(
        value.to(compute).contiguous(),
        spatial_shapes.to(torch.long).contiguous(),
        level_start_index.to(torch.long).contiguous(),
        sampling_locations.to(compute).contiguous(),
        attention_weights.to(compute).contiguous(),
    )
    return out.to(dtype)
