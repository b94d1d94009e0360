"""Multi-scale deformable attention speed and memory: kswap's kernel vs the grid_sample reference vs mmcv.

DINO-sized shapes: batch 2, four levels of a 512x512 image at strides 8-64 (64², 32², 16², 8²; S = 5440),
8 heads of 32 channels, 4 points, for the decoder's cross-attention (900 queries) and the encoder's
self-attention (one query per position). Prints forward and forward+backward medians side by side in one
run with the ratios, and the peak extra memory of one forward+backward (each method in a fresh process).
On a machine with CUDA it times the CUDA paths too.

Usage: ``python bench/msda.py [--repeats N] [--threads N] [--out FILE]``
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from kswap.ops import compiled_available, ms_deform_attn, ms_deform_attn_reference

SHAPES = [(64, 64), (32, 32), (16, 16), (8, 8)]
CASES = {"decoder (900 queries)": 900, "encoder (5440 queries)": sum(h * w for h, w in SHAPES)}


def inputs(queries: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(SHAPES)
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
        elif getattr(mmcv_msda, "ext_module", None) is not None:
            out["mmcv CUDA op"] = lambda v, s, i, lo, a: mmcv_msda.MultiScaleDeformableAttnFunction.apply(
                v, s, i, lo, a, 64)
    except ImportError:
        pass
    return out


def time_once(fn, args, backward: bool, device: str) -> float:
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

    args = inputs(CASES[case])
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "msda.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results, lines = {}, []
    for device in devices:
        for case, queries in CASES.items():
            data = inputs(queries, device)
            row = {}
            for name, fn in methods(device).items():
                for kind, backward in (("forward", False), ("forward+backward", True)):
                    time_once(fn, data, backward, device)  # warm-up
                    times = [time_once(fn, data, backward, device) for _ in range(args.repeats)]
                    row.setdefault(name, {})[kind] = 1000 * statistics.median(times)
                if device == "cpu":
                    row[name]["peak_mb"] = peak_memory_mb(name, case)
            results[f"{device} {case}"] = row
            lines.append(f"\n{device}, {case}, {args.threads} threads, median of {args.repeats} (ms)")
            lines.append(f"{'method':<24}{'forward':>10}{'fwd+bwd':>10}{'peak MB':>9}"
                         f"{'fwd ratio':>11}{'f+b ratio':>11}")
            ref = row["grid_sample reference"]
            for name, r in row.items():
                lines.append(f"{name:<24}{r['forward']:>10.1f}{r['forward+backward']:>10.1f}"
                             f"{r.get('peak_mb', float('nan')):>9.1f}{ref['forward'] / r['forward']:>10.2f}x"
                             f"{ref['forward+backward'] / r['forward+backward']:>10.2f}x")
    lines.append("\nratio = reference time / method time (higher is faster)")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "repeats": args.repeats, "results": results,
                                          "table": lines}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
