"""Multi-scale deformable attention speed and memory: kswap's kernel vs the grid_sample reference vs mmcv.

DINO-sized shapes: batch 2, four levels of a 512x512 image at strides 8-64 (64², 32², 16², 8²; S = 5440),
8 heads of 32 channels, 4 points, for the decoder's cross-attention (900 queries) and the encoder's
self-attention (one query per position), and the decoder on an 800x1333 image (S = 22223: a map sampled
sparsely, which the kernel reads in place instead of copying each head's rows into a dense plane). Prints
forward and forward+backward medians (the methods timed in turn, repeat after repeat, so that load on a shared
machine hits them alike) with the ratios, and the peak extra memory of one forward+backward (each method in a
fresh process). A last row times one whole stock DINO-4scale R50 encoder layer (mmdet's
``DeformableDetrTransformerEncoderLayer``: 256 channels, 8 heads, 4 levels, 4 points, FFN 2048) on a 256x256
input, with mmcv's op routed to kswap's kernel or left on its grid_sample path (``mmdet_swap.route_msda_to_kswap``).
On a machine with CUDA it times the CUDA paths too (``--device cuda`` for those alone).

Usage: ``python bench/msda.py [--repeats N] [--threads N] [--device cpu|cuda] [--note TEXT] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

from kswap.ops import compiled_available, ms_deform_attn, ms_deform_attn_reference

SHAPES = [(64, 64), (32, 32), (16, 16), (8, 8)]
LARGE_SHAPES = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 at strides 8-64
CASES = {"decoder (900 queries)": (900, SHAPES), "encoder (5440 queries)": (sum(h * w for h, w in SHAPES), SHAPES),
         "decoder, 800x1333 image (900 queries)": (900, LARGE_SHAPES)}
LAYER_IMAGE = (256, 256)
LAYER_SHAPES = [(LAYER_IMAGE[0] // s, LAYER_IMAGE[1] // s) for s in (8, 16, 32, 64)]  # DINO-4scale: C3-C5 + one


def inputs(queries: int, device: str = "cpu", seed: int = 0, level_shapes: list = SHAPES) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(2, int(sizes.sum()), 8, 32, generator=g)
    loc = torch.rand(2, queries, 8, 4, 4, 2, generator=g)
    attn = torch.rand(2, queries, 8, 4, 4, generator=g).softmax(-1)
    return tuple(t.to(device) for t in (value, shapes, starts, loc, attn))


def methods(device: str) -> dict:
    out = {}
    if compiled_available(device):
        out["kswap kernel"] = ms_deform_attn
    out["grid_sample reference"] = ms_deform_attn_reference
    try:
        from mmcv.ops import multi_scale_deform_attn as mmcv_msda

        if device == "cpu":
            out["mmcv CPU path"] = lambda v, s, i, lo, a: mmcv_msda.multi_scale_deformable_attn_pytorch(v, s, lo, a)
        else:
            op = lambda v, s, i, lo, a: mmcv_msda.MultiScaleDeformableAttnFunction.apply(v, s, i, lo, a, 64)  # noqa: E731
            try:
                op(*inputs(8, device))
                out["mmcv CUDA op"] = op
            except (AttributeError, RuntimeError) as err:  # mmcv built without its CUDA ops (e.g. FORCE_CUDA=0)
                print(f"mmcv CUDA op unavailable: {str(err).splitlines()[0]}", file=sys.stderr)
    except ImportError:
        pass
    return out


def time_once(fn, args, backward: bool, device: str) -> float:
    """One forward (and backward) of fn on fresh leaves made before the clock starts."""
    leaves = [t.detach().clone().requires_grad_(backward and t.is_floating_point()) for t in args]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*leaves)
    if backward:
        out.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(method: str, case: str) -> float:
    """Peak resident-memory growth (MB) of one forward+backward, measured in a fresh process."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import msda; "
            f"print(msda._child_peak({method!r}, {case!r}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _child_peak(method: str, case: str) -> float:
    """Sample this process's resident memory every millisecond during one forward+backward."""
    import threading

    queries, level_shapes = CASES[case]
    args = inputs(queries, level_shapes=level_shapes)
    fn = methods("cpu")[method]
    time_once(fn, inputs(8), True, "cpu")  # load code paths before the baseline
    base, peak, done = _rss_mb(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    thread = threading.Thread(target=sample)
    thread.start()
    time_once(fn, args, True, "cpu")
    done.set()
    thread.join()
    return max(peak[0], _rss_mb()) - base


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument callable, all warmed up, then timed in turn for each repeat."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(fn())
    return {name: statistics.median(t) for name, t in times.items()}


def encoder_layer_row(device: str, repeats: int) -> dict:
    """fwd+bwd ms of one stock DINO-4scale R50 encoder layer, op routed to kswap's kernel vs mmcv's grid_sample."""
    from mmdet.models.layers.transformer.deformable_detr_layers import DeformableDetrTransformerEncoderLayer

    from mmdet_swap import msda_routed_to_kswap, route_msda_to_kswap

    torch.manual_seed(0)
    layer = DeformableDetrTransformerEncoderLayer(
        self_attn_cfg=dict(embed_dims=256, num_heads=8, num_levels=4, num_points=4, dropout=0.0, batch_first=True),
        ffn_cfg=dict(embed_dims=256, feedforward_channels=2048, ffn_drop=0.0)).to(device)
    shapes = torch.tensor(LAYER_SHAPES, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    positions = int(sizes.sum())
    query = torch.randn(2, positions, 256, device=device)
    pos = torch.randn(2, positions, 256, device=device)
    ref = torch.rand(2, positions, 4, 2, device=device)
    mask = torch.zeros(2, positions, dtype=torch.bool, device=device)

    def step(routed: bool):
        def run() -> float:
            route_msda_to_kswap(routed)
            q = query.clone().requires_grad_()
            layer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            layer(q, pos, mask, spatial_shapes=shapes, level_start_index=starts,
                  reference_points=ref).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start
        return run

    with msda_routed_to_kswap():  # restores mmcv's own path after the rounds, which switch it per call
        med = interleaved_medians({"kswap kernel": step(True), "grid_sample (mmcv CPU path)": step(False)}, repeats)
    return {name: {"forward+backward": 1000 * t} for name, t in med.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                        help="all: the CPU, and CUDA when available")
    parser.add_argument("--note", default="", help="recorded with the results (e.g. whether the machine was shared)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "msda.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = {"all": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []), "cpu": ["cpu"],
               "cuda": ["cuda"]}[args.device]
    results, lines = {}, []
    for device in devices:
        for case, (queries, level_shapes) in CASES.items():
            data = inputs(queries, device, level_shapes=level_shapes)
            fns = {(name, kind): partial(time_once, fn, data, backward, device)
                   for name, fn in methods(device).items()
                   for kind, backward in (("forward", False), ("forward+backward", True))}
            row = {}
            for (name, kind), t in interleaved_medians(fns, args.repeats).items():
                row.setdefault(name, {})[kind] = 1000 * t
            if device == "cpu":
                for name in row:
                    row[name]["peak_mb"] = peak_memory_mb(name, case)
            results[f"{device} {case}"] = row
            lines.append(f"\n{device}, {case}, {args.threads} threads, median of {args.repeats} (ms)")
            lines.append(f"{'method':<28}{'forward':>10}{'fwd+bwd':>10}{'peak MB':>9}"
                         f"{'fwd ratio':>11}{'f+b ratio':>11}")
            ref = row["grid_sample reference"]
            for name, r in row.items():
                lines.append(f"{name:<28}{r['forward']:>10.1f}{r['forward+backward']:>10.1f}"
                             f"{r.get('peak_mb', float('nan')):>9.1f}{ref['forward'] / r['forward']:>10.2f}x"
                             f"{ref['forward+backward'] / r['forward+backward']:>10.2f}x")
        layer_case = f"{device} DINO-4scale R50 encoder layer ({'x'.join(map(str, LAYER_IMAGE))} input)"
        row = encoder_layer_row(device, args.repeats)
        results[layer_case] = row
        lines.append(f"\n{layer_case}, {args.threads} threads, median of {args.repeats} (ms)")
        lines.append(f"{'op routed to':<28}{'fwd+bwd':>10}{'f+b ratio':>11}")
        base = row["grid_sample (mmcv CPU path)"]["forward+backward"]
        for name, r in row.items():
            lines.append(f"{name:<28}{r['forward+backward']:>10.1f}{base / r['forward+backward']:>10.2f}x")
    lines.append("\nratio = grid_sample time / method time (higher is faster)")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/msda.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(json.dumps({"command": command.strip(), "note": args.note, "threads": args.threads,
                                          "repeats": args.repeats, "torch": torch.__version__,
                                          "results": results, "table": lines}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
