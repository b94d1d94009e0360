"""Scoring cost: what share of a swap run's wall time scoring takes in each host, measured and at the defaults.

**Measured** (``measured`` in the JSON). Short real swap runs through each host's own entry point on the tests' rigs
(``tests/swap_testing``), each reading its ``swap_report.json``: ``timing`` (``scoring_s``, ``run_s``) and the curve
rows (the images each score read; a row at step 0 or at a phase end is a whole-set score, any other a periodic
subsample):

* ``timm``: ``timm_swap.train.main`` with ``--plugin swap`` on sklearn's real 8x8 digits as ImageFolders (digits 0-7
  pretrained, 8 and 9 learned, 0 forgotten) and the tests' tiny ViT (2 blocks, dim 64), pretrained by the same script.
* ``mmdet``: mmengine's ``Runner`` on the tests' tiny DINO (``tiny_dino.py``: mmdet's DINO-4scale config, ResNet-18,
  96x96) with the three ``SwapHook`` config lines (``swap_cfg``), glyph scenes of real MNIST / Fashion-MNIST
  (``glyph_coco.py``); the pretrained checkpoint is two iterations of mmdet's own loop (timing only).
* ``detectron2``: the swap trainer (``d2_models.run_swap`` / ``swap_glyphs`` / ``glyph_cfg``) on ``MiniMask2Former``
  (Mask2Former's module names and preset) and the glyph segmentation sets; random weights (timing only).

Per host, a run of S steps per phase and one of 3S (scores before and at phase ends only), then one of S with the
host's periodic scores every S/4 steps on 30 images per set (timm ``--swap-eval-interval``, detectron2
``SWAP.EVAL_PERIOD``; mmdet has none)::

    c_step     = ((run_s - scoring_s)[3S] - (run_s - scoring_s)[S]) / (steps[3S] - steps[S])   (setup cancels)
    whole      = scoring_s / whole-set rows (of both runs),  c_img = whole / images inferred per whole scoring
    subsample  = (scoring_s - whole-set rows x whole) / subsample rows,  c_sub = subsample / images inferred

Images inferred per scoring (from a row's per-set counts): timm scores each set on its own images (their sum);
mmdet infers the union of the sets' test images once (every set's count is that union); detectron2 runs each test
dataset once, and the rig's forget and retain sets share theirs (the retain and learn counts).

**Projected** (``projected``). The share at each host's default cadence and phase lengths, read from the code
(timm's ``--swap-eval-interval`` / ``--swap-eval-images`` defaults and ``--swap-task`` preset, ``SwapHook``'s config,
``add_swap_config``'s ``SWAP.EVAL_PERIOD`` / ``EVAL_IMAGES`` / ``LEARN_LENGTH`` / ``FORGET_LENGTH``), for test sets of
N images per set::

    scoring = W x 3 x N x c_img + P x 3 x min(n, N) x c_img
    share   = scoring / (sum over phases of steps_p x c_step_p + scoring)

with W = 1 + phases (before and each phase end), P = the multiples of the eval interval up to the last step that are
not phase ends, n = the periodic images per set. A phase measured in epochs of its retain-side loader has
epochs x ceil(sets x k x N / batch) steps, each of its retain role's sets holding k training images per test image
(``--train-per-test``) and the batch being the one the step cost was measured at (a larger batch lowers the share of
a phase measured in steps). Two cost sources: ``tests' rig`` (the costs measured above, c_step_p = c_step), and
``stock`` for mmdet and detectron2 (``bench/results/host_cost.json`` at ``--stock-size`` px: DINO R50, Mask2Former
R50; c_img = inference per image, c_step_p = roles of the phase x one training step of batch 2, a swap step running
one batch per loss role). The measured c_sub is reported beside c_img, not projected: on the rigs' 30-image
subsamples it carries each scoring's fixed cost, which a default subsample of up to 200 images spreads thinner.
3 x N counts every set's images apart: where sets share test images (mmdet's union, detectron2's shared datasets)
scoring reads fewer, so the share is an upper bound there.

Usage: ``python bench/scoring_cost.py [--host timm mmdet detectron2] [--steps N] [--test-images 100 500]
[--train-per-test 1 10] [--stock-size 512] [--note "..."] [--out bench/results/scoring_cost.json]``
(``--steps``: S for every host picked, default each host's own). Set ``OMP_NUM_THREADS`` (recorded).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from step_overhead import machine  # also puts tests/ (the rigs) and demo/ on the path

from kswap import SwapConfig
from kswap.metrics import SETS
from kswap.phases import Phase, PhaseScheduler, plan_phases

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.10
SUBSAMPLE_IMAGES = 30  # below every rig set's size, so the periodic scores read real subsamples
STOCK = {"mmdet": "dino", "detectron2": "mask2former"}  # host_cost.json's model of each host

# Runs a swap of ``steps`` steps per phase into ``out`` (periodic scores every ``interval`` steps, 0: none) and
# returns its swap_report.json.
SwapRun = Callable[[Path, int, int], dict[str, Any]]


@dataclass
class Rig:
    """A host's swap on the tests' rig: how to run it, its batch per role, the images a scoring infers."""

    run: SwapRun
    batch: int
    inferred: Callable[[Mapping[str, int]], int]
    setup: str
    periodic: bool = True  # the host has periodic scores (subsamples between phase ends)


@dataclass
class Defaults:
    """A host's default swap: its config (phases, lengths), periodic score interval (0: none) and images per set."""

    config: SwapConfig
    eval_interval: int
    eval_images: int
    source: str


# -- timm -----------------------------------------------------------------------------------------------------------

BATCH = 32  # per loss role, as the tests' swaps


def timm_rig(work: Path) -> Rig:
    """sklearn's digits as ImageFolders (``old``: 0-7, ``new``: 8, 9, as tests/conftest.py writes them), the tiny
    ViT pretrained on ``old`` for two epochs by ``timm_swap.train`` itself."""
    from timm_swap.train import main

    from swap_testing.data import load_digits, write_digit_folders
    from swap_testing.models import TINY_VIT_FLAGS

    # The tests' tiny ViT (tests/timm/test_timm_swap.py), its batch per loss role as the tests' swaps.
    vit_flags = [*TINY_VIT_FLAGS, "--num-classes", "8", "-b", str(BATCH)]
    write_digit_folders(work, *load_digits())
    pretrained = main(["--data-dir", str(work / "old"), *vit_flags, "--epochs", "2", "--opt", "adamw", "--lr", "3e-3",
                       "--no-aug", "--smoothing", "0", "--warmup-epochs", "0", "--output", str(work),
                       "--experiment", "pretrain"]).output_dir / "last.pth"

    def run(out: Path, steps: int, interval: int) -> dict[str, Any]:
        ctx = main(["--data-dir", str(work / "old"), "--swap-learn-dir", str(work / "new"), *vit_flags,
                    "--initial-checkpoint", str(pretrained), "--output", str(out.parent), "--experiment", out.name,
                    "--plugin", "swap", "--swap-forget", "0", "--swap-learn-length", f"{steps}steps",
                    "--swap-forget-length", f"{steps}steps", "--swap-eval-interval", str(interval),
                    "--swap-eval-images", str(SUBSAMPLE_IMAGES)])
        return json.loads((ctx.output_dir / "swap_report.json").read_text())

    return Rig(run, BATCH, inferred=lambda images: sum(images[s] for s in SETS), setup=(
        f"timm_swap.train main --plugin swap; tests' tiny ViT (2 blocks, dim 64, 8x8 inputs), batch {BATCH} per role; "
        "sklearn digits as ImageFolders (test sets: forget 0, retain 1-7, learn 8-9, each scored on its own images)"))


def timm_defaults() -> Defaults:
    from timm_swap.swap import swap_config_from_args
    from timm_swap.train import parse_args

    args, _ = parse_args(["--plugin", "swap", "--swap-forget", "f", "--swap-learn", "l"])
    return Defaults(swap_config_from_args(args), args.swap_eval_interval, args.swap_eval_images,
                    f"timm_swap.train defaults: --swap-task {args.swap_task}, --swap-eval-interval "
                    f"{args.swap_eval_interval}, --swap-eval-images {args.swap_eval_images}")


# -- mmdet ----------------------------------------------------------------------------------------------------------

def mmdet_rig(work: Path) -> Rig:
    """Glyph COCO sets as the tests write them (fewer images), the tiny DINO after two iterations of mmdet's loop."""
    from mmdet.utils import register_all_modules
    from mmengine.runner import Runner

    import mmdet_swap  # noqa: F401  (registers SwapHook, as the config's custom_imports does for tools/train.py)

    from swap_testing.glyph_coco import write_glyph_coco
    from swap_testing.tiny_dino import DIGITS, LEARN, swap_cfg, tiny_dino_config

    register_all_modules()
    for source, classes, n_train, n_val, seed in (("mnist", DIGITS, 64, 60, 0), ("fashion", LEARN, 64, 40, 2)):
        write_glyph_coco(work, source, classes, n_train, "train", seed)
        write_glyph_coco(work, source, classes, n_val, "val", seed + 1)
    Runner.from_cfg(tiny_dino_config(work, DIGITS, work / "pretrain", max_iters=2)).train()

    def run(out: Path, steps: int, interval: int) -> dict[str, Any]:
        cfg = swap_cfg(work, work / "pretrain" / "iter_2.pth", out)
        cfg.custom_hooks[0].update(learn_length=f"{steps}steps", forget_length=f"{steps}steps")
        Runner.from_cfg(cfg).train()
        return json.loads((out / "swap_report.json").read_text())

    batch = tiny_dino_config(work, DIGITS, work).train_dataloader.batch_size  # SwapHook's batch per role
    return Rig(run, batch, inferred=lambda images: images["forget"], periodic=False, setup=(
        "mmengine Runner with SwapHook (tests' swap_cfg); tests' tiny DINO (ResNet-18, 1+2 layers, 96x96), "
        f"batch {batch} per role; glyph COCO test sets: 60 digit and 40 clothing images, scored as their union"))


def mmdet_defaults() -> Defaults:
    from mmdet_swap import SwapHook

    learn = dict(classes=("l",), train=dict(ann_file="train.json"), val=dict(ann_file="val.json"))
    return Defaults(SwapHook(forget=("f",), learn=learn).config, 0, 0,
                    "SwapHook's defaults (detection preset); SwapHook has no periodic scores")


# -- detectron2 -----------------------------------------------------------------------------------------------------

def detectron2_rig(work: Path) -> Rig:
    """The tests' registered glyph segmentation sets and an untrained MiniMask2Former saved as the "pretrained"
    model (as tests/detectron2/test_detectron2_run.py does)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from swap_testing.d2_models import glyph_cfg, run_swap, swap_glyphs, write_glyph_spec

    write_glyph_spec(work)
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(glyph_cfg(str(work), meta="MiniMask2Former")), str(work)).save("pretrained")

    def run(out: Path, steps: int, interval: int) -> dict[str, Any]:
        cfg = swap_glyphs(glyph_cfg(str(out), meta="MiniMask2Former"), work / "pretrained.pth", learn=steps,
                          forget=steps, EVAL_PERIOD=interval, EVAL_IMAGES=SUBSAMPLE_IMAGES)
        run_swap(cfg)
        return json.loads((out / "swap_report.json").read_text())

    batch = glyph_cfg(str(work)).SOLVER.IMS_PER_BATCH
    return Rig(run, batch, inferred=lambda images: images["retain"] + images["learn"], setup=(
        "detectron2 swap trainer (tests' run_swap); MiniMask2Former (Mask2Former's names and preset, 64 px), "
        f"batch {batch} per role, random weights; glyph test sets of 100 images (forget and retain share theirs, "
        "run once)"))


def detectron2_defaults() -> Defaults:
    from detectron2.config import get_cfg

    from detectron2_swap import add_swap_config
    from detectron2_swap.config import swap_config_from_cfg

    cfg = get_cfg()
    add_swap_config(cfg)
    cfg.SWAP.FORGET, cfg.SWAP.LEARN = ["f"], ["l"]
    s = cfg.SWAP
    return Defaults(swap_config_from_cfg(cfg), s.EVAL_PERIOD, s.EVAL_IMAGES,
                    f"add_swap_config: SWAP.LEARN_LENGTH {s.LEARN_LENGTH}, FORGET_LENGTH {s.FORGET_LENGTH}, "
                    f"EVAL_PERIOD {s.EVAL_PERIOD}, EVAL_IMAGES {s.EVAL_IMAGES}")


# Per host: its rig, its defaults, and S (steps per phase of the short run).
HOSTS: dict[str, tuple[Callable[[Path], Rig], Callable[[], Defaults], int]] = {
    "timm": (timm_rig, timm_defaults, 200),
    "mmdet": (mmdet_rig, mmdet_defaults, 40),
    "detectron2": (detectron2_rig, detectron2_defaults, 40),
}


# -- measuring ------------------------------------------------------------------------------------------------------

def whole_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The curve rows of whole-set scores: before (step 0) and each phase end."""
    ends = {0} | {p["end_step"] for p in report["metrics"]["phases"]}
    return [r for r in report["curve"] if r["step"] in ends]


def run_summary(report: Mapping[str, Any], steps: int, interval: int) -> dict[str, Any]:
    """What one run's report says: its steps, scoring rows, seconds and share."""
    whole = whole_rows(report)
    timing = report["timing"]
    return {"steps_per_phase": steps, "eval_interval": interval, "steps": report["metrics"]["phases"][-1]["end_step"],
            "whole_rows": len(whole), "subsample_rows": len(report["curve"]) - len(whole),
            "images": {"whole": whole[0]["images"],
                       "subsample": next((r["images"] for r in report["curve"] if r not in whole), None)},
            "scoring_s": timing["scoring_s"], "run_s": timing["run_s"], "share": timing["scoring_s"] / timing["run_s"]}


def measure(rig: Rig, work: Path, steps: int) -> dict[str, Any]:
    """The short, long and (where the host has them) periodic runs, and the costs derived from them."""
    plan = {"short": (steps, 0), "long": (3 * steps, 0)}
    if rig.periodic:
        plan["periodic"] = (steps, max(1, steps // 4))
    runs = {name: run_summary(rig.run(work / f"swap_{name}", n, interval), n, interval)
            for name, (n, interval) in plan.items()}
    short, long = runs["short"], runs["long"]
    step_s = ((long["run_s"] - long["scoring_s"]) - (short["run_s"] - short["scoring_s"])) / (
        long["steps"] - short["steps"])
    whole_s = (short["scoring_s"] + long["scoring_s"]) / (short["whole_rows"] + long["whole_rows"])
    whole_images = rig.inferred(short["images"]["whole"])
    costs: dict[str, Any] = {"step_s": step_s, "whole_scoring_s": whole_s, "whole_images": whole_images,
                             "image_s": whole_s / whole_images, "subsample_scoring_s": None,
                             "subsample_images": None, "subsample_image_s": None}
    if rig.periodic:
        p = runs["periodic"]
        sub_s = (p["scoring_s"] - p["whole_rows"] * whole_s) / p["subsample_rows"]
        sub_images = rig.inferred(p["images"]["subsample"])
        costs.update(subsample_scoring_s=sub_s, subsample_images=sub_images, subsample_image_s=sub_s / sub_images)
    return {"runs": runs, "costs": costs}


# -- projecting -----------------------------------------------------------------------------------------------------

def phase_steps(config: SwapConfig, n_test: int, train_per_test: float | None, batch: int) -> list[tuple[Phase, int]]:
    """Each default phase and its steps; a phase in epochs has ceil(sets x k x N / batch) steps per epoch."""
    phases = plan_phases(config)
    per_epoch = None if train_per_test is None else (
        lambda p: math.ceil(len(p.sources["retain"]) * train_per_test * n_test / batch))
    return list(zip(phases, PhaseScheduler(phases, per_epoch).phase_steps, strict=True))


def project(defaults: Defaults, n_test: int, train_per_test: float | None, batch: int,
            step_s: Callable[[Phase], float], image_s: float) -> dict[str, Any]:
    """The share of scoring in a default run with test sets of ``n_test`` images (the docstring's formula)."""
    steps = phase_steps(defaults.config, n_test, train_per_test, batch)
    ends = set(itertools.accumulate(n for _, n in steps))
    total = max(ends)
    interval = defaults.eval_interval
    periodic = sum(1 for s in range(interval, total + 1, interval) if s not in ends) if interval else 0
    whole = 1 + len(steps)
    scoring = (whole * n_test + periodic * min(defaults.eval_images, n_test)) * len(SETS) * image_s
    training = sum(n * step_s(phase) for phase, n in steps)
    return {"test_images": n_test, "train_per_test": train_per_test, "steps": total, "whole_scorings": whole,
            "periodic_scorings": periodic, "scoring_s": scoring, "training_s": training,
            "share": scoring / (training + scoring)}


def stock_costs(host: str, size: int) -> dict[str, Any] | None:
    """The stock model's training step and inference per image at ``size`` px from host_cost.json, if recorded."""
    path = ROOT / "bench" / "results" / "host_cost.json"
    model = STOCK.get(host)
    results = json.loads(path.read_text()) if path.is_file() else {}
    if model not in results:
        return None
    row = next((r for r in results[model]["rows"] if r["size"] == size), None)
    if row is None:
        return None
    return {"model": model, "title": results[model]["table"][0], "note": results[model]["note"], **row}


def projections(host: str, defaults: Defaults, measured: Mapping[str, Any], args: argparse.Namespace,
                batch: int) -> list[dict[str, Any]]:
    """The projected shares for each cost source, test-set size and (phases in epochs) training-set ratio."""
    in_epochs = any(p.length.epochs is not None for p in plan_phases(defaults.config))
    ratios = args.train_per_test if in_epochs else [None]
    costs = measured["costs"]
    sources = [("tests' rig", batch, lambda p: costs["step_s"], costs["image_s"])]
    stock = stock_costs(host, args.stock_size)
    if stock is not None:
        sources.append((f"stock {stock['model']} {stock['size']}px", stock["batch"],
                        lambda p: len(p.roles) * stock["train_step_s"], stock["inference_per_image_s"]))
    rows = []
    for name, source_batch, step_s, image_s in sources:
        for n_test in args.test_images:
            for ratio in ratios:
                rows.append({"costs": name, "batch": source_batch,
                             **project(defaults, n_test, ratio, source_batch, step_s, image_s)})
    return rows


# -- entry point ----------------------------------------------------------------------------------------------------

def table(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The measured runs, the costs derived from them and the projected shares, as text."""
    lines = ["measured runs (swap_report.json)",
             f"{'host':<11}{'run':<9}{'steps':>6}{'every':>6}{'whole':>6}{'sub':>5}{'scoring s':>11}{'run s':>9}"
             f"{'share':>8}"]
    for host, r in results.items():
        for name, run in r["measured"]["runs"].items():
            lines.append(f"{host:<11}{name:<9}{run['steps']:>6}{run['eval_interval'] or '-':>6}{run['whole_rows']:>6}"
                         f"{run['subsample_rows']:>5}{run['scoring_s']:>11.2f}{run['run_s']:>9.2f}"
                         f"{100 * run['share']:>7.1f}%")
    lines += ["", "measured costs (tests' rigs)",
              f"{'host':<11}{'step s':>8}{'whole s':>9}{'images':>7}{'ms/img':>8}{'sub s':>8}{'images':>7}"
              f"{'ms/img':>8}"]
    for host, r in results.items():
        c = r["measured"]["costs"]
        sub = (f"{c['subsample_scoring_s']:>8.3f}{c['subsample_images']:>7}{1000 * c['subsample_image_s']:>8.2f}"
               if c["subsample_scoring_s"] is not None else f"{'-':>8}{'-':>7}{'-':>8}")
        lines.append(f"{host:<11}{c['step_s']:>8.3f}{c['whole_scoring_s']:>9.3f}{c['whole_images']:>7}"
                     f"{1000 * c['image_s']:>8.2f}{sub}")
    lines += ["", "projected share at the defaults (W whole scorings, P periodic; k train images per test image)",
              f"{'host':<11}{'costs':<24}{'N':>5}{'k':>4}{'steps':>7}{'W':>3}{'P':>4}{'scoring s':>11}"
              f"{'training s':>12}{'share':>8}"]
    for host, r in results.items():
        for p in r["projected"]:
            k = "-" if p["train_per_test"] is None else f"{p['train_per_test']:g}"
            flag = "  > 10 %" if p["share"] > GOAL else ""
            lines.append(f"{host:<11}{p['costs']:<24}{p['test_images']:>5}{k:>4}{p['steps']:>7}{p['whole_scorings']:>3}"
                         f"{p['periodic_scorings']:>4}{p['scoring_s']:>11.1f}{p['training_s']:>12.1f}"
                         f"{100 * p['share']:>7.1f}%{flag}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", nargs="+", choices=list(HOSTS), default=list(HOSTS))
    own = ", ".join(f"{host} {steps}" for host, (_, _, steps) in HOSTS.items())
    parser.add_argument("--steps", type=int, default=None, help=f"S, steps per phase of the short run ({own})")
    parser.add_argument("--test-images", type=int, nargs="+", default=[100, 500], help="N, test images per set")
    parser.add_argument("--train-per-test", type=float, nargs="+", default=[1.0, 10.0],
                        help="k, training images per test image of a set (phases measured in epochs)")
    parser.add_argument("--stock-size", type=int, default=512, help="image size of host_cost.json's rows")
    parser.add_argument("--note", default="", help="e.g. whether other work ran on the machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring_cost.json"))
    args = parser.parse_args()
    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {}
    results = saved.get("hosts", {})  # each host's entry replaces its previous one; the others' stay
    command = f"python bench/scoring_cost.py {shlex.join(sys.argv[1:])}".strip()
    with tempfile.TemporaryDirectory() as tmp:
        for host in args.host:
            build, default_cadence, steps = HOSTS[host]
            info = machine(args.note)
            work = Path(tmp) / host
            work.mkdir()
            rig = build(work)
            defaults = default_cadence()
            measured = measure(rig, work, args.steps or steps)
            info["load_average_at_end"] = list(os.getloadavg())
            stock = stock_costs(host, args.stock_size)
            results[host] = {"command": command, "machine": info, "setup": rig.setup, "measured": measured,
                             "defaults": defaults.source, "stock": stock,
                             "projected": projections(host, defaults, measured, args, rig.batch)}
    lines = table(results)
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    formula = ("share = (W x 3 x N x c_img + P x 3 x min(n, N) x c_img) / (sum_p steps_p x c_step_p + that); "
               "W = 1 + phases, P = multiples of the eval interval that are not phase ends, n = eval images per set")
    out.write_text(json.dumps({"goal_share": GOAL, "formula": formula, "hosts": results, "table": lines}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
