"""Run a knowledge swap with Mask2Former's own ``train_net.py``, edited as README and docs/detectron2.md say (CPU).

Clones a Mask2Former checkout (a work tree or a bare git dir), edits a copy of its ``train_net.py`` (the
``detectron2_swap`` import, ``enable_msda_fallback()`` before ``from mask2former import``, ``add_swap_config(cfg)``,
``class Trainer(SwapTrainerMixin, Trainer)``) and registers the glyph semantic-segmentation sets of
``tests/swap_testing`` there, as a user registers their own. With the stock ADE20K R50 semantic config, small
inputs and ``--num-gpus 1``, it then checks that:

1. an earlier key (``SWAP.FORGET_CLASSES``) stops with the error naming ``SWAP.FORGET``;
2. ``train_net.py`` without ``SWAP`` pretrains on the digits (background, 0-3) from random weights;
3. the swap (forget 3, learn trouser and bag, two steps per phase) runs both phases from that checkpoint and writes
   its outputs and log keys, ``metrics.json`` holding each score of the report (before and every phase end) as
   scored;
4. an unedited ``train_net.py`` (only ``swapped_datasets.json``'s sets registered, and an empty
   ``MultiScaleDeformableAttention`` module where the op was never compiled, so Mask2Former takes its own PyTorch
   path) evaluates ``config_swapped.yaml`` with ``--eval-only`` without importing kswap, detectron2_swap or peft;
5. the edited ``train_net.py`` (the swapped sets registered too) evaluates it with ``--eval-only`` into
   ``inference/<set>/`` per set and prints each set's score, the report's.

Usage: ``OMP_NUM_THREADS=1 python scripts/mask2former_train_net_check.py MASK2FORMER WORK_DIR [--pretrain-iters N]``
(about 10 minutes on 2 busy cores). Prints a JSON summary; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5", "INPUT.MIN_SIZE_TRAIN", "(128,)",
         "INPUT.MAX_SIZE_TRAIN", "512", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "512",
         "INPUT.CROP.SIZE", "(128,128)", "INPUT.SIZE_DIVISIBILITY", "128", "SOLVER.IMS_PER_BATCH", "2",
         "SOLVER.AMP.ENABLED", "False", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
         "SOLVER.CHECKPOINT_PERIOD", "100000", "DATASETS.TRAIN", '("glyph_digits_train",)',
         "DATASETS.TEST", '("glyph_digits_val",)']
# name: (source, stuff classes, images, split, seed); small enough to score on CPU in seconds.
GLYPH_SETS = {"glyph_digits_train": ("mnist", ["background", "0", "1", "2", "3"], 200, "train", 1),
              "glyph_digits_val": ("mnist", ["background", "0", "1", "2", "3"], 20, "test", 2),
              "glyph_clothes_train": ("fashion", ["background", "trouser", "bag"], 100, "train", 3),
              "glyph_clothes_val": ("fashion", ["background", "trouser", "bag"], 20, "test", 4)}
SWAP_YAML = """_BASE_: maskformer2_R50_bs16_160k.yaml
MODEL:
  WEIGHTS: {weights}
SWAP:
  ENABLED: True
  ORDER: learn_then_forget
  {forget_key}: ["3"]
  LEARN: ["trouser", "bag"]
  DATASETS:
    FORGET: ("glyph_digits_train",)
    RETAIN: ("glyph_digits_train",)
    LEARN: ("glyph_clothes_train",)
    FORGET_TEST: ("glyph_digits_val",)
    RETAIN_TEST: ("glyph_digits_val",)
    LEARN_TEST: ("glyph_clothes_val",)
  LEARN_LENGTH: 2steps
  FORGET_LENGTH: 2steps
  EVAL_PERIOD: 0
"""
REGISTER = '''

def register_datasets(path={spec!r}):
    import json
    from detectron2.data import DatasetCatalog
    spec = json.load(open(path))
    for name, entry in {items}:
        DatasetCatalog.register(name, lambda records=entry["records"]: records)
        MetadataCatalog.get(name).set(stuff_classes={classes}, ignore_label=255, evaluator_type="sem_seg"{extra})


register_datasets()
'''
SETS = ("forget", "retain", "learn")
OUTPUTS = ("swap_report.json", "swap_report.md", "swap_report.png", "model_swapped.pth", "swap_adapter.safetensors",
           "config_swapped.yaml", "swapped_datasets.json")
LOG_KEYS = ("swap/forget", "swap/retain", "swap/learn", "swap/loss/retain/task", "swap/loss/learn/task",
            "swap/loss/forget/task", "swap/loss/group_sparse")


def edit(text: str, anchor: str, insert: str, before: bool = True) -> str:
    """Insert ``insert`` before (or after) the one occurrence of ``anchor``."""
    assert text.count(anchor) == 1, f"train_net.py changed upstream: {anchor!r} is not there once"
    return text.replace(anchor, insert + anchor if before else anchor + insert)


def swap_train_net(text: str, spec: Path) -> str:
    """The README's edit, plus the user's dataset registration."""
    text = edit(text, "# MaskFormer\nfrom mask2former import", "from detectron2_swap import SwapTrainerMixin, "
                "add_swap_config, enable_msda_fallback\nenable_msda_fallback()\n\n")
    text = edit(text, "\n\ndef setup(args):", "\n\nclass Trainer(SwapTrainerMixin, Trainer):\n    pass\n" +
                REGISTER.format(spec=str(spec), items="spec.items()", classes='entry["stuff_classes"]', extra=""))
    return edit(text, "    add_maskformer2_config(cfg)\n", "    add_swap_config(cfg)\n", before=False)


def register_swapped(text: str, spec: Path) -> str:
    """README's registration of ``swapped_datasets.json``'s sets at ``spec``."""
    return edit(text, "\n\ndef setup(args):", REGISTER.format(
        spec=str(spec), items='spec["datasets"].items()', classes='spec["stuff_classes"]',
        extra=', swap_set=entry["set"], swap_classes=entry["classes"]'))


def plain_train_net(text: str, spec: Path) -> str:
    """Upstream's script with the swapped test sets registered; it reports which swap modules got imported."""
    stub = ("import sys, types\nsys.modules.setdefault('MultiScaleDeformableAttention', "
            "types.ModuleType('MultiScaleDeformableAttention'))\n\n")
    text = register_swapped(edit(text, "# MaskFormer\nfrom mask2former import", stub), spec)
    report = ("        print('swap modules imported:', sorted(m for m in sys.modules "
              "if m.split('.')[0] in ('kswap', 'detectron2_swap', 'peft')))\n")
    return edit(text, "        return res\n\n    trainer = Trainer(cfg)", report)


def write_glyph_sets(root: Path) -> Path:
    """The glyph sets as images and label PNGs, and their records JSON."""
    sys.path.insert(0, str(REPO / "tests"))
    from swap_testing.glyph_coco import write_glyph_semseg

    spec = {name: {"records": write_glyph_semseg(root, source, stuff[1:], stuff, n, split, seed),
                   "stuff_classes": stuff} for name, (source, stuff, n, split, seed) in GLYPH_SETS.items()}
    path = root / "datasets.json"
    path.write_text(json.dumps(spec))
    return path


def run(m2f: Path, script: str, config: str, out: Path, *opts: str, eval_only: bool = False) -> tuple[int, str]:
    """``python <script> --config-file <config> --num-gpus 1 ...``; returns the exit code and the output."""
    cmd = [sys.executable, script, "--config-file", config, "--num-gpus", "1", *(["--eval-only"] * eval_only),
           *SMALL * (not eval_only), *opts, "OUTPUT_DIR", str(out)]
    done = subprocess.run(cmd, cwd=m2f, capture_output=True, text=True)
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    return done.returncode, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mask2former", help="a Mask2Former work tree or git dir to clone")
    parser.add_argument("work", type=Path, help="an empty folder for the clone, data and outputs")
    parser.add_argument("--pretrain-iters", type=int, default=30)
    args = parser.parse_args()
    work, m2f = args.work.resolve(), args.work.resolve() / "Mask2Former"
    if work.exists() and any(work.iterdir()):
        parser.error(f"{work} is not empty: give a new or empty folder (the check clones and trains there)")
    subprocess.run(["git", "clone", "-q", args.mask2former, str(m2f)], check=True)
    upstream = (m2f / "train_net.py").read_text()
    swapped = work / "swap" / "swapped_datasets.json"
    (m2f / "train_net.py").write_text(swap_train_net(upstream, write_glyph_sets(work / "data")))
    (m2f / "train_net_plain.py").write_text(plain_train_net(upstream, swapped))
    (m2f / "train_net_eval.py").write_text(register_swapped((m2f / "train_net.py").read_text(), swapped))
    swap_yaml = Path(CONFIG).with_name("glyph_swap.yaml")
    weights = work / "pretrain" / "model_final.pth"
    checks = {}

    (m2f / swap_yaml).write_text(SWAP_YAML.format(weights=weights, forget_key="FORGET_CLASSES"))
    rc, log = run(m2f, "train_net.py", str(swap_yaml), work / "old_key")
    checks["old key stops, naming SWAP.FORGET"] = rc != 0 and "renamed to SWAP.FORGET;" in log
    rc, _ = run(m2f, "train_net.py", CONFIG, work / "pretrain", "MODEL.WEIGHTS", "",
                "SOLVER.MAX_ITER", str(args.pretrain_iters))
    checks["pretraining without SWAP"] = rc == 0 and weights.exists()
    (m2f / swap_yaml).write_text(SWAP_YAML.format(weights=weights, forget_key="FORGET"))
    rc, log = run(m2f, "train_net.py", str(swap_yaml), work / "swap")
    checks["swap runs both phases"] = rc == 0 and all(f"Swap: after {p}" in log for p in ("0_learn", "1_forget"))
    checks["swap outputs"] = all((work / "swap" / name).exists() for name in OUTPUTS)
    metrics = (work / "swap" / "metrics.json").read_text() if (work / "swap" / "metrics.json").exists() else ""
    checks["log keys in metrics.json"] = all(f'"{key}"' in metrics for key in LOG_KEYS)
    report = json.loads((work / "swap" / "swap_report.json").read_text()) if checks["swap outputs"] else {}
    logged = [{s: r[f"swap/{s}"] for s in SETS} for r in map(json.loads, metrics.splitlines()) if "swap/forget" in r]
    checks["metrics.json scores are the report's"] = bool(report) and logged == [
        {s: r[s] for s in SETS} for r in report["curve"]]
    rc, log = run(m2f, "train_net_plain.py", str(work / "swap" / "config_swapped.yaml"), work / "eval_plain",
                  "MODEL.WEIGHTS", str(work / "swap" / "model_swapped.pth"), eval_only=True)
    checks["plain --eval-only of the swapped model"] = (rc == 0 and "swap modules imported: []" in log
                                                       and log.count("copypaste: Task: sem_seg") == 3)
    after = report["metrics"]["after"] if report else {}
    rc, log = run(m2f, "train_net_eval.py", str(work / "swap" / "config_swapped.yaml"), work / "eval_sets",
                  eval_only=True)
    printed = {s: float(m[1]) for s in SETS if (m := re.search(rf"Swap: {s} mIoU ([-\d.]+)", log))}
    checks["--eval-only with the swap's train_net.py: a folder and the score per set"] = rc == 0 and all(
        (work / "eval_sets" / "inference" / s / "sem_seg_evaluation.pth").exists()
        and f"copypaste: Task: swap/{s}\n" in log and abs(printed.get(s, -1) - after.get(s, 1e9)) < 0.5
        for s in SETS)
    print(json.dumps({"checks": checks, "swap_metrics": report.get("metrics"), "printed_set_scores": printed,
                      "logs": str(work)}, indent=1))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
