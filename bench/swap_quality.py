"""Swap quality, side by side on the demo's data and seeds: orders, baselines and the oracle.

Runs ``train.py`` (the same script users run) once per method on the MNIST -> Fashion-MNIST demo task and
prints one table of forget / retain / learn accuracy, H-mean and wall time, saved as JSON too:

- learn_then_forget, forget_then_learn, joint (the library's one-phase ablation);
- finetune R∪L: LoRA fine-tuning on R and L with no forgetting term (joint order, beta = 0);
- unbounded GA: learn-then-forget with the bound removed (BND = 1e9: plain gradient ascent on F);
- oracle: a model trained from scratch on R ∪ L only (it cannot output the forget classes).

Then it times one swap step against one plain LoRA fine-tuning step on the same images (overhead ratio,
``bench/step_overhead.py``'s timm measure).

Usage: ``python bench/swap_quality.py [--out bench/results/swap_quality.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))
from step_overhead import time_interleaved, timm_steps  # noqa: E402

from kswap import swap_hmean  # noqa: E402

from prepare_data import prepare  # noqa: E402
from swap_mnist import pretrained_checkpoint  # noqa: E402

TRAIN = ROOT / "train.py"
LEARN = ["trouser", "sneaker", "bag", "ankle-boot"]
METHODS = {
    "learn_then_forget": ["--swap-order", "learn_then_forget"],
    "forget_then_learn": ["--swap-order", "forget_then_learn"],
    "joint": ["--swap-order", "joint", "--swap-forget-length", "800steps"],
    "finetune R∪L": ["--swap-order", "joint", "--swap-forget-length", "800steps", "--swap-beta", "0"],
    "unbounded GA": ["--swap-order", "learn_then_forget", "--swap-bnd", "1e9"],
}


def swap_report(name: str, extra: list[str], roots: dict[str, Path], ckpt: Path, out: Path) -> tuple[dict, float]:
    """Run the demo's swap with ``extra`` flags as experiment ``name``; its swap_report.json and the wall time."""
    exp = name.replace(" ", "_").replace("∪", "u")
    cmd = [sys.executable, str(TRAIN), "-c", str(ROOT / "demo" / "swap.yaml"), "--data-dir", str(roots["mnist"]),
           "--swap-learn-dir", str(roots["fashion"]), "--initial-checkpoint", str(ckpt), "--output", str(out),
           "--experiment", exp, "--no-progress", "--log-interval", "0", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / exp / "swap_report.json").read_text()), wall


def run_swap(name: str, extra: list[str], roots: dict[str, Path], ckpt: Path, out: Path) -> dict:
    report, wall = swap_report(name, extra, roots, ckpt, out)
    return {**report["metrics"]["after"], "hmean": report.get("hmean", 0.0), "wall_s": wall,
            "before": report["metrics"]["before"]}


def train_oracle(roots: dict[str, Path], out: Path) -> tuple[Any, list[str], float]:
    """Train from scratch on R ∪ L (a symlinked ImageFolder) with the pretraining recipe.

    Returns:
        The training context (``ctx.model``), the class names in label order and the wall time.
    """
    from timm_swap.train import main as train_main

    data = out / "oracle_data"
    for split in ("train", "val"):
        for d in [str(i) for i in range(2, 10)]:
            _link(roots["mnist"] / split / d, data / split / d)
        for c in LEARN:
            _link(roots["fashion"] / split / c, data / split / c)
    start = time.perf_counter()
    ctx = train_main(["-c", str(ROOT / "demo" / "pretrain.yaml"), "--data-dir", str(data), "--num-classes", "12",
                      "--output", str(out), "--experiment", "oracle", "--no-progress", "--log-interval", "0"])
    return ctx, sorted(p.name for p in (data / "train").iterdir()), time.perf_counter() - start


def oracle(roots: dict[str, Path], out: Path) -> dict:
    """The oracle's score on each set (it has no output for the forgotten digits: forget 0)."""
    import torch

    from timm_swap.data import image_folder
    from timm_swap.evaluation import evaluate_top1

    ctx, names, wall = train_oracle(roots, out)
    retain_map = {str(i): names.index(str(i)) for i in range(2, 10)}
    learn_map = {c: names.index(c) for c in LEARN}

    def loader(root: Path, class_map: dict[str, int]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(image_folder(root, "val", ctx.data_config, class_map), batch_size=256)

    scores = {"forget": 0.0,  # the oracle has no output for 0 and 1
              "retain": evaluate_top1(ctx.model, loader(roots["mnist"], retain_map), ctx.device),
              "learn": evaluate_top1(ctx.model, loader(roots["fashion"], learn_map), ctx.device)}
    return {**scores, "wall_s": wall}


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_quality.json"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args()
    roots = prepare(per_class_train=1000, per_class_val=300)
    ckpt = pretrained_checkpoint(roots["mnist"])
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.methods:
            print(f"running {name} ...", flush=True)
            results[name] = run_swap(name, METHODS[name], roots, ckpt, Path(tmp))
        print("running oracle ...", flush=True)
        oracle_result = oracle(roots, Path(tmp))
    before = next(iter(results.values()))["before"] if results else None
    oracle_result["hmean"] = swap_hmean(before, oracle_result) if before else None
    results["oracle (R∪L from scratch)"] = oracle_result
    overhead = time_interleaved(timm_steps(ckpt, roots), repeats=60)

    header = f"{'method':<28}{'forget ↓':>10}{'retain ↑':>10}{'learn ↑':>10}{'H-mean':>9}{'wall s':>9}"
    lines = [header, "-" * len(header)]
    if before:
        lines.append(f"{'pretrained':<28}{before['forget']:>10.2f}{before['retain']:>10.2f}{before['learn']:>10.2f}")
    for name, r in results.items():
        lines.append(f"{name:<28}{r['forget']:>10.2f}{r['retain']:>10.2f}{r['learn']:>10.2f}"
                     f"{(r['hmean'] or 0):>9.2f}{r['wall_s']:>9.1f}")
    lines.append("")
    lines.append(f"step overhead: swap {overhead['swap_step_ms']:.1f} ms vs plain LoRA fine-tuning "
                 f"{overhead['plain_step_ms']:.1f} ms per step (160 images, median of {overhead['repeats']}): "
                 f"ratio {overhead['ratio']:.3f}")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"pretrained": before, "methods": results, "step_overhead": overhead,
                                          "table": lines}, indent=2, default=float))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
