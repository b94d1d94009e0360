"""The kswap kernel inside mmdet: mmcv's MultiScaleDeformableAttention (DINO's layer) routed to kswap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch


def test_mmcv_dino_layer_unchanged_when_routed_to_kswap():
    from mmcv.ops import MultiScaleDeformableAttention

    from mmdet_swap import msda, msda_routed_to_kswap

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

    msda.route_msda_to_kswap(False)
    theirs = run()
    with msda_routed_to_kswap():
        assert msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda.kswap_multi_scale_deformable_attn
        ours = run()
    assert msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda._MMCV_PYTORCH  # as it was before
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-5)
    for name in theirs[2]:
        torch.testing.assert_close(ours[2][name], theirs[2][name], rtol=1e-3, atol=1e-4, msg=name)


def test_import_changes_neither_mmcv_nor_mmengine():
    """``import mmdet_swap`` (what custom_imports does) registers its classes and patches nothing: a SwapHook
    run routes the kernel and the checkpoint loader for itself."""
    code = textwrap.dedent("""
        from mmcv.ops import multi_scale_deform_attn
        from mmengine.runner.checkpoint import CheckpointLoader
        before = (multi_scale_deform_attn.multi_scale_deformable_attn_pytorch, dict(CheckpointLoader._schemes))
        import mmdet_swap
        assert before == (multi_scale_deform_attn.multi_scale_deformable_attn_pytorch,
                          dict(CheckpointLoader._schemes))
        print("unchanged")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "unchanged" in out.stdout, out.stderr[-2000:]
