"""Random multi-scale deformable attention inputs shared by the op tests and the host-shim tests."""

from __future__ import annotations

import torch


def make_inputs(n=2, heads=2, channels=3, shapes=((5, 7), (3, 4), (1, 2)), queries=6, points=3,
                dtype=torch.float64, spread=0.2, seed=0):
    """Random inputs; ``spread`` pushes sampling points past the map edges (outside points sample zero)."""
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.rand(n, int(sizes.sum()), heads, channels, generator=g, dtype=dtype)
    loc = torch.rand(n, queries, heads, len(shapes), points, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    attn = torch.rand(n, queries, heads, len(shapes), points, generator=g, dtype=dtype) + 1e-5
    attn = attn / attn.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, level_start_index, loc, attn
