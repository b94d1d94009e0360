"""Swap quality, side by side on the demo's data and seeds: orders, baselines and the oracle.

Runs ``train.py`` (the same script users run) once per method on the MNIST -> Fashion-MNIST demo task and
prints one table of forget / retain / learn accuracy, H-mean and wall time, saved as JSON too:

- learn_then_forget (the demo's config), and the same without each of its two levers (LoRA on the attention
  projections too; distillation towards the end-of-learn model in the forget phase) and without both (the
  reference recipe);
- forget_then_learn, joint (the library's one-phase ablation);
- finetune R∪L: LoRA fine-tuning on R and L with no forgetting term (joint order, beta = 0);
- unbounded GA: learn-then-forget with the bound removed (BND = 1e9: plain gradient ascent on F);
- oracle: a model trained from scratch on R ∪ L only (it cannot output the forget classes).

over the demo's own pretrained model and models pretrained with other seeds (``--seeds``), with min / mean over
seeds and, per seed, whether the demo's targets and the stricter oracle goal (forget <= 1 %, retain within 1 point
of the pretrained model, learn within 3 points of the oracle) were met. The step overhead is
``bench/step_overhead.py``'s.

Usage: ``python bench/swap_quality.py [--seeds 0 1] [--no-demo-seed] [--methods ...] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

from kswap import swap_hmean  # noqa: E402

from prepare_data import prepare  # noqa: E402
from swap_mnist import pretrained_checkpoint, target_checks  # noqa: E402

TRAIN = ROOT / "train.py"
LEARN = ["trouser", "sneaker", "bag", "ankle-boot"]
# Extra flags over demo/swap.yaml (which turns on the levers: LoRA on attention too, forget-phase distillation, a
# cosine LR to 1e-4 per phase and an 800-step learn phase). The demo's schedule before the last two levers:
CONSTANT_LR_400 = ["--swap-min-lr", "0.01", "--swap-learn-length", "400steps"]
REFERENCE = ["--swap-lora-targets", "timm_vit", "--swap-forget-loss-distill", "0", *CONSTANT_LR_400]
METHODS = {
    "learn_then_forget": ["--swap-order", "learn_then_forget"],
    "reference (FFN LoRA, no distill)": REFERENCE,
    "no distill (attn + FFN LoRA)": ["--swap-forget-loss-distill", "0"],
    "FFN LoRA + distill": ["--swap-lora-targets", "timm_vit"],
    "forget_then_learn": ["--swap-order", "forget_then_learn"],
    "joint": ["--swap-order", "joint", "--swap-forget-length", "800steps"],
    "finetune R∪L": ["--swap-order", "joint", "--swap-forget-length", "800steps", "--swap-forget-loss-beta", "0"],
    "unbounded GA": ["--swap-order", "learn_then_forget", "--swap-forget-loss-bnd", "1e9"],
}
FFN = ["--swap-lora-targets", "timm_vit"]
# The sweep that chose the demo's levers (one run each on the demo's seed: `--seeds --methods <these>`); not in
# the default run.
SWEEP = {
    "FFN LoRA, distill 1": [*FFN, "--swap-forget-loss-distill", "1"],
    "FFN LoRA, distill 3": [*FFN, "--swap-forget-loss-distill", "3"],
    "FFN LoRA, learn + forget distill 1": [*FFN, "--swap-forget-loss-distill", "1", "--swap-learn-loss-distill", "1"],
    "FFN LoRA rank 16, distill 1": [*FFN, "--swap-lora-rank", "16", "--swap-forget-loss-distill", "1"],
    "FFN LoRA, 800 learn steps, distill 1": [*FFN, "--swap-learn-length", "800steps",
                                             "--swap-forget-loss-distill", "1"],
    "attn + FFN LoRA, distill 1": ["--swap-forget-loss-distill", "1"],
    "attn + FFN LoRA, distill 3": ["--swap-forget-loss-distill", "3"],
    # The demo's config misses the oracle goal's learn bar on seeds 0 and 1 (docs/benchmarks.md): a longer learn
    # phase with a shorter forget phase, an annealed LR (cosine per phase, as the reference, ending at 1e-4), and that
    # with a heavier retain term or a longer learn phase (`--no-demo-seed --seeds 0 1` runs the missed seeds only).
    # These start from the demo's earlier schedule (CONSTANT_LR_400); the last one is the demo's config now.
    "demo, 800 learn + 200 forget steps": [*CONSTANT_LR_400, "--swap-learn-length", "800steps",
                                           "--swap-forget-length", "200steps"],
    "demo, cosine LR to 1e-4 per phase": [*CONSTANT_LR_400, "--swap-min-lr", "1e-4"],
    "demo, cosine LR to 1e-4 per phase, learn retain weight 2": [*CONSTANT_LR_400, "--swap-min-lr", "1e-4",
                                                                 "--swap-learn-loss-retain-weight", "2"],
    "demo, cosine LR to 1e-4 per phase, 800 learn steps": [*CONSTANT_LR_400, "--swap-min-lr", "1e-4",
                                                           "--swap-learn-length", "800steps"],
}
ORACLE = "oracle (R∪L from scratch)"


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
    phases = report["metrics"]["phases"]
    return {**report["metrics"]["after"], "hmean": report.get("hmean", 0.0), "wall_s": wall,
            "before": report["metrics"]["before"], "phase_ends": {p["name"]: p["after"] for p in phases}}


def train_oracle(roots: dict[str, Path], out: Path, seed: int | None = None) -> tuple[Any, list[str], float]:
    """Train from scratch on R ∪ L (a symlinked ImageFolder) with the pretraining recipe (and ``seed``).

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
                      "--output", str(out), "--experiment", "oracle", "--no-progress", "--log-interval", "0",
                      *seed_flags(seed)])
    return ctx, sorted(p.name for p in (data / "train").iterdir()), time.perf_counter() - start


def oracle(roots: dict[str, Path], out: Path, seed: int | None = None) -> dict:
    """The oracle's score on each set (it has no output for the forgotten digits: forget 0)."""
    import torch

    from timm_swap.data import image_folder
    from timm_swap.evaluation import evaluate_top1

    ctx, names, wall = train_oracle(roots, out, seed)
    retain_map = {str(i): names.index(str(i)) for i in range(2, 10)}
    learn_map = {c: names.index(c) for c in LEARN}

    def loader(root: Path, class_map: dict[str, int]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(image_folder(root, "val", ctx.data_config, class_map), batch_size=256)

    scores = {"forget": 0.0,  # the oracle has no output for 0 and 1
              "retain": evaluate_top1(ctx.model, loader(roots["mnist"], retain_map), ctx.device),
              "learn": evaluate_top1(ctx.model, loader(roots["fashion"], learn_map), ctx.device)}
    return {**scores, "wall_s": wall}


def seed_flags(seed: int | None) -> list[str]:
    """``--seed`` for a run of pretraining seed ``seed`` (``None``: the demo's own seed, from its YAML files)."""
    return [] if seed is None else ["--seed", str(seed)]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src, dst)


def demo_targets(before: dict, after: dict, oracle_learn: float) -> dict[str, bool]:
    """The demo's own targets (swap_mnist.TARGETS) and the stricter goals measured against the oracle."""
    drop = before["retain"] - after["retain"]
    return {"demo": all(target_checks(before, after).values()),
            "oracle_goal": after["forget"] <= 1.0 and drop <= 1.0 and after["learn"] >= oracle_learn - 3.0}


def one_seed(seed: int | None, methods: list[str], roots: dict[str, Path], out: Path) -> dict[str, dict]:
    """Every method and the oracle from the model pretrained with ``seed``."""
    ckpt = pretrained_checkpoint(roots["mnist"], seed)
    label = "the demo's seed" if seed is None else f"seed {seed}"
    rows: dict[str, dict] = {}
    for name in methods:
        print(f"{label}: running {name} ...", flush=True)
        flags = {**METHODS, **SWEEP}[name]
        rows[name] = run_swap(name, [*flags, *seed_flags(seed)], roots, ckpt, out / f"seed{seed}")
        print(f"{label}: {name}: {scores_line(rows[name])}", flush=True)
    print(f"{label}: running the oracle ...", flush=True)
    rows[ORACLE] = oracle(roots, out / f"seed{seed}", seed)
    print(f"{label}: {ORACLE}: {scores_line(rows[ORACLE])}", flush=True)
    before = next(iter(rows.values()))["before"]
    rows[ORACLE]["hmean"] = swap_hmean(before, rows[ORACLE])
    for name in methods:
        rows[name]["targets"] = demo_targets(before, rows[name], rows[ORACLE]["learn"])
    return {"pretrained": before, "rows": rows}


def scores_line(row: dict) -> str:
    """One row's scores and wall time, printed as each run ends (a long sweep shows its progress)."""
    return f"forget {row['forget']:.2f}  retain {row['retain']:.2f}  learn {row['learn']:.2f}  ({row['wall_s']:.0f} s)"


def summary(per_seed: dict[str, dict]) -> dict[str, dict]:
    """Per method: min and mean over seeds of each score (and of the retain drop), and how many seeds met the
    targets."""
    out: dict[str, dict] = {}
    for name in next(iter(per_seed.values()))["rows"]:
        rows = [(r["pretrained"], r["rows"][name]) for r in per_seed.values()]
        stats = {}
        for key in ("forget", "retain", "learn"):
            values = [row[key] for _, row in rows]
            stats[key] = {"min": min(values), "mean": statistics.fmean(values), "max": max(values)}
        drops = [pre["retain"] - row["retain"] for pre, row in rows]
        stats["retain_drop"] = {"min": min(drops), "mean": statistics.fmean(drops), "max": max(drops)}
        if "targets" in rows[0][1]:
            stats["seeds_meeting"] = {t: sum(row["targets"][t] for _, row in rows) for t in rows[0][1]["targets"]}
        out[name] = stats
    return out


def table(per_seed: dict[str, dict], stats: dict[str, dict]) -> list[str]:
    width = max(32, *(len(name) + 2 for name in stats))  # sweep rows have long names
    header = (f"{'method':<{width}}{'forget ↓ max':>13}{'retain drop ↓ mean/max':>24}{'learn ↑ mean/min':>18}"
              f"{'demo / oracle goal':>20}")
    lines = [header, "-" * len(header)]
    pre = [r["pretrained"] for r in per_seed.values()]
    lines.append(f"{'pretrained (retain, forget)':<{width}}{min(p['forget'] for p in pre):>13.2f}"
                 f"{statistics.fmean(p['retain'] for p in pre):>24.2f}")
    n = len(per_seed)
    for name, st in stats.items():
        met = st.get("seeds_meeting")
        goals = f"{met['demo']}/{n} , {met['oracle_goal']}/{n}" if met else ""
        lines.append(f"{name:<{width}}{st['forget']['max']:>13.2f}"
                     f"{st['retain_drop']['mean']:>15.2f} / {st['retain_drop']['max']:<6.2f}"
                     f"{st['learn']['mean']:>10.2f} / {st['learn']['min']:<6.2f}{goals:>16}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_quality.json"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=[*METHODS, *SWEEP])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1],
                        help="pretraining (and swap) seeds besides the demo's own model")
    parser.add_argument("--no-demo-seed", action="store_true",
                        help="run only --seeds (e.g. the seeds a config misses), not the demo's own model")
    args = parser.parse_args()
    roots = prepare(per_class_train=1000, per_class_val=300)
    per_seed: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [*([] if args.no_demo_seed else [None]), *args.seeds]:
            per_seed["demo" if seed is None else str(seed)] = one_seed(seed, args.methods, roots, Path(tmp))
    stats = summary(per_seed)
    lines = table(per_seed, stats)
    print("\n".join(lines))
    command = shlex.join(["python", "bench/swap_quality.py", *sys.argv[1:]])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command.strip(), "threads": os.environ.get("OMP_NUM_THREADS"),
                                          "seeds": list(per_seed), "per_seed": per_seed, "summary": stats,
                                          "table": lines}, indent=2, default=float))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
