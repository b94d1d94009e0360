"""Multi-scale deformable attention: the compiled kernel against the grid_sample reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kswap.ops import compiled_available, ms_deform_attn, ms_deform_attn_reference
from kswap.ops.deform_attn import _MSDeformAttnFunction

from swap_testing.msda_inputs import make_inputs

# scripts/install.sh always builds kswap._C; only a build with KSWAP_BUILD_EXT=0 may lack it.
needs_kernel = pytest.mark.skipif(os.environ.get("KSWAP_BUILD_EXT") == "0" and not compiled_available("cpu"),
                                  reason="built with KSWAP_BUILD_EXT=0")


@needs_kernel
def test_extension_is_built():
    assert compiled_available("cpu")


# The CUDA kernels run where a GPU and a CUDA build are at hand (scripts/gpu_check.sh); CI has neither.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and compiled_available("cuda")), reason="needs a GPU and kswap._C built with CUDA"))]


def _grads(fn, inputs, device="cpu"):
    value, shapes, starts, loc, attn = [t.to(device).requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(value, shapes, starts, loc, attn)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)
    out.backward(grad_out)
    return tuple(t.cpu() for t in (out.detach(), value.grad, loc.grad, attn.grad))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [
    dict(),
    dict(n=1, heads=1, channels=1, shapes=((1, 1),), queries=1, points=1),
    dict(n=3, heads=4, channels=5, shapes=((9, 11), (5, 6), (3, 3), (2, 1)), queries=13, points=4),
    dict(n=5, heads=3, channels=8, shapes=((4, 4),), queries=17, points=2, spread=0.6),  # many points outside
    dict(n=2, heads=3, channels=4, shapes=((3, 3), (2, 2)), queries=200, points=4),  # many queries per position
    dict(n=2, heads=2, channels=32, shapes=((6, 5), (3, 3)), queries=9, points=4, spread=0.3),  # D in registers
    dict(n=1, heads=2, channels=33, shapes=((4, 7),), queries=5, points=3, spread=0.3),  # D past a vector multiple
    # the kernel copies each head's map into a dense plane when its rows are sampled often, else reads in place
    dict(n=2, heads=2, channels=32, shapes=((6, 5), (3, 3)), queries=40, points=4, spread=0.6),  # dense, D = 32
    dict(n=2, heads=3, channels=8, shapes=((9, 11), (5, 6)), queries=3, points=2, spread=0.6),  # in place
])
def test_forward_backward_match_reference_float64(case, device):
    inputs = make_inputs(**case)
    ours = _grads(ms_deform_attn, inputs, device)
    ref = _grads(ms_deform_attn_reference, inputs)
    for a, b, name in zip(ours, ref, ("output", "grad_value", "grad_locations", "grad_attention"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@needs_kernel
@pytest.mark.parametrize("case", [
    dict(n=2, heads=8, channels=32, shapes=((12, 10), (6, 5), (3, 3), (2, 1)), queries=70, points=4, spread=0.3),
    dict(n=2, heads=3, channels=32, shapes=((9, 11), (5, 6)), queries=3, points=3, spread=0.6),
    dict(n=1, heads=2, channels=33, shapes=((7, 4), (2, 3)), queries=40, points=5, spread=0.3),
])
def test_float32_matches_reference(case):
    """The float32 kernels (DINO's and Mask2Former's dtype) run other vector lanes than float64's."""
    inputs = [t.float() if t.is_floating_point() else t for t in make_inputs(**case)]
    ours, ref = _grads(ms_deform_attn, inputs), _grads(ms_deform_attn_reference, inputs)
    for a, b, name in zip(ours, ref, ("output", "grad_value", "grad_locations", "grad_attention"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_float32_tolerance(device):
    inputs = make_inputs(dtype=torch.float32, n=2, heads=8, channels=32, shapes=((16, 16), (8, 8), (4, 4), (2, 2)),
                         queries=50, points=4)
    for a, b in zip(_grads(ms_deform_attn, inputs, device), _grads(ms_deform_attn_reference, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [2, 32])  # run-time D, and D in vector registers
def test_gradcheck(channels, device):
    inputs = make_inputs(n=1, heads=2, channels=channels, shapes=((3, 4), (2, 2)), queries=3, points=2, spread=0.1)
    value, shapes, starts, loc, attn = [t.to(device) for t in inputs]
    # keep points off the pixel grid lines, where bilinear sampling is not differentiable
    loc = (loc * 0.9 + 0.03).requires_grad_()
    value.requires_grad_()
    attn.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, lo, a: _MSDeformAttnFunction.apply(v, shapes, starts, lo, a),
                                    (value, loc, attn), eps=1e-6, atol=1e-5)


@needs_kernel
def test_baseline_instruction_set_matches_reference():
    """The kernels built for the baseline x86-64 instruction set (CPUs without AVX2) also match, in a process
    that forces them."""
    code = textwrap.dedent("""
        import torch
        from swap_testing.msda_inputs import make_inputs
        from kswap.ops import ms_deform_attn, ms_deform_attn_reference
        for channels in (32, 5):
            inputs = make_inputs(channels=channels, spread=0.3)
            grads = []
            for fn in (ms_deform_attn, ms_deform_attn_reference):
                leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
                out = fn(*leaves)
                out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
                grads.append([out.detach()] + [leaves[k].grad for k in (0, 3, 4)])
            for a, b in zip(*grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        print("parity ok")
    """)
    env = {**os.environ, "KSWAP_CPU_ISA": "baseline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and "parity ok" in result.stdout, result.stderr[-3000:]


@needs_kernel
def test_python_m_kswap_ops_says_the_cpu_instruction_set():
    def said(**env: str) -> str:
        return subprocess.run([sys.executable, "-m", "kswap.ops"], check=True, capture_output=True, text=True,
                              env={**os.environ, **env}).stdout.strip()

    assert said(KSWAP_CPU_ISA="baseline").endswith("; CPU baseline")
    assert said().endswith(("; CPU avx2+fma", "; CPU baseline"))  # baseline where the CPU has no AVX2 + FMA


@needs_kernel
def test_non_contiguous_inputs_are_made_contiguous():
    value, shapes, starts, loc, attn = make_inputs()
    value_t = value.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    loc_t = loc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_t.is_contiguous() and not loc_t.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(value_t, shapes, starts, loc_t, attn),
                               ms_deform_attn_reference(value, shapes, starts, loc, attn))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_level_table_may_stay_on_the_cpu(device):
    value, shapes, starts, loc, attn = make_inputs()
    moved = [t.to(device) for t in (value, loc, attn)]
    torch.testing.assert_close(ms_deform_attn(moved[0], shapes, starts, moved[1], moved[2]).cpu(),
                               ms_deform_attn_reference(value, shapes, starts, loc, attn))


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_half_is_upcast(device):
    value, shapes, starts, loc, attn = [t.to(device) for t in make_inputs(dtype=torch.float32)]
    out = ms_deform_attn(value.half(), shapes, starts, loc.half(), attn.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ms_deform_attn_reference(value, shapes, starts, loc, attn),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mutate, message", [
    (lambda v, s, i, lo, a: (v[0], s, i, lo, a), r"value must be \(N, S, M, D\)"),
    (lambda v, s, i, lo, a: (v, s, i, lo[..., 0], a), r"sampling_locations must be \(N, Lq, M, L, P, 2\)"),
    (lambda v, s, i, lo, a: (v, s[:2], i, lo, a), "spatial_shapes"),
    (lambda v, s, i, lo, a: (v, s, i, lo[:1], a), "does not match value"),
    (lambda v, s, i, lo, a: (v, s, i, lo, a[..., :1]), "attention_weights must be"),
    (lambda v, s, i, lo, a: (v[:, :-1], s, i, lo, a), "do not cover S"),
])
def test_wrong_shapes_are_rejected(mutate, message):
    with pytest.raises(ValueError, match=message):
        ms_deform_attn(*mutate(*make_inputs()))


@needs_kernel
def test_kernel_checks_its_own_inputs():
    from kswap import _C

    value, shapes, starts, loc, attn = make_inputs()
    with pytest.raises(RuntimeError, match="must be contiguous"):
        _C.ms_deform_attn_forward(value.transpose(0, 1).contiguous().transpose(0, 1), shapes, starts, loc, attn)
    with pytest.raises(RuntimeError, match="level_start_index"):
        _C.ms_deform_attn_forward(value, shapes, starts + 1, loc, attn)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _C.ms_deform_attn_forward(value.half(), shapes, starts, loc.half(), attn.half())


def test_reference_fallback_without_extension(monkeypatch):
    monkeypatch.setattr("kswap.ops.deform_attn.compiled_available", lambda device: False)
    inputs = make_inputs()
    for a, b in zip(_grads(ms_deform_attn, inputs), _grads(ms_deform_attn_reference, inputs), strict=True):
        torch.testing.assert_close(a, b)
