"""The kswap kernel inside mmdet: mmcv's MultiScaleDeformableAttention (DINO's layer) routed to kswap."""

from __future__ import annotations

import torch


def test_mmcv_dino_layer_unchanged_when_routed_to_kswap():
    from mmcv.ops import MultiScaleDeformableAttention

    import mmdet_swap
    from mmdet_swap import msda

    torch.manual_seed(0)
    layer = MultiScaleDeformableAttention(embed_dims=256, num_heads=8, num_levels=4, num_points=4, batch_first=True,
                                          dropout=0.0)
    layer.init_weights()
    shapes = torch.tensor([[12, 12], [6, 6], [3, 3], [2, 2]])
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 256)
    query = torch.randn(2, 30, 256)
    ref_points = torch.rand(2, 30, 4, 2)

    def run():
        layer.zero_grad()
        q = query.clone().requires_grad_()
        out = layer(q, value=value, reference_points=ref_points, spatial_shapes=shapes, level_start_index=starts)
        out.square().sum().backward()
        return out.detach(), q.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}

    assert msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda.kswap_multi_scale_deformable_attn
    ours = run()
    mmdet_swap.route_msda_to_kswap(False)
    try:
        theirs = run()
    finally:
        mmdet_swap.route_msda_to_kswap(True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-3, atol=1e-4, msg=name)
