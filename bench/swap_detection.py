"""Detection swap quality on the tests' tiny DINO (mmdet host): orders, LoRA fine-tuning and the oracle, side by side.

The tests' rig, at bench size: ``tests/swap_testing/tiny_dino.py`` (mmdet's own DINO-4scale config with a ResNet-18
trunk, one encoder and two decoder layers, 96x96 inputs) on the glyph scenes of ``tests/swap_testing/glyph_coco.py``
(real MNIST digits and Fashion-MNIST garments pasted on blank canvases, as COCO files). The detector is pretrained
from scratch on the digits 0, 1, 2 with mmdet's own Runner; each row then starts from that checkpoint (same data,
same seed) and forgets 0, retains 1 and 2 and learns trouser and bag:

- learn_then_forget (SwapHook's default), forget_then_learn, joint (one phase as long as the other two together);
- LoRA fine-tune R∪L: the joint phase with the forgetting term's weight ``beta`` set to 0 (the forget images still
  go through the model, with no weight in the loss): LoRA fine-tuning on R and L alone;
- oracle: the same tiny DINO trained from scratch with mmdet's Runner, as long as the pretraining, on R ∪ L only in
  the joint class list: the swap's retain and learn training sets (the digit images showing a 1 or 2, any 0 on them
  unlabelled; the garments), so it never saw a labelled 0.

Per row: bbox mAP of each set and ``forget_any`` (class-agnostic AP of the 0s) as the swap report computes them
(the hook's ``swap_report.json``; the oracle through ``mmdet_swap.evaluation.SetScorer`` on the same sets), the
H-mean of the report, and the row's wall time (a swap row's includes its three scorings: before and after each
phase; the oracle's its training and one scoring). The pretrained scores are the report's ``before``. Data and
pretrained checkpoints are cached under ``$KSWAP_CACHE`` (``~/.cache/kswap``), keyed by what made them: a rerun
skips the pretraining (its wall time then reads about 0).

Usage: ``python bench/swap_detection.py [--seeds 0] [--pretrain-iters 400] [--learn-steps 100] [--forget-steps 100]
[--rows ...] [--note "..."] [--out bench/results/swap_detection.json]``
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(ROOT / "bench"), str(ROOT / "demo"), str(ROOT / "tests")]

import mmdet  # noqa: E402
from mmdet.registry import DATASETS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from step_overhead import machine  # noqa: E402

from kswap import LabelSpace, swap_hmean  # noqa: E402
from mmdet_swap import SwapHook  # noqa: E402  (registers SwapHook and SwapCocoDataset)
from mmdet_swap.evaluation import SetScorer  # noqa: E402

from prepare_data import CACHE  # noqa: E402
from swap_testing import glyph_coco, tiny_dino  # noqa: E402
from swap_testing.glyph_coco import write_glyph_coco  # noqa: E402
from swap_testing.tiny_dino import DIGITS, LEARN, swap_cfg, tiny_dino_config  # noqa: E402

# (source, classes, images, split, seed) of each COCO file: the tests' scenes, more of them.
SCENES = [("mnist", DIGITS, 1200, "train", 0), ("mnist", DIGITS, 200, "val", 1),
          ("fashion", LEARN, 800, "train", 2), ("fashion", LEARN, 120, "val", 3)]
ROWS = ["learn_then_forget", "forget_then_learn", "joint", "LoRA fine-tune R∪L"]
ORACLE = "oracle (R∪L from scratch)"
SCORES = ("forget", "forget_any", "retain", "learn")


def cached(*parts: Any) -> Path:
    """A cache folder keyed by the rig's sources and ``parts`` (what else made its content)."""
    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (glyph_coco, tiny_dino)))
    digest.update(json.dumps(parts, default=str).encode())
    return CACHE / "bench" / "swap_detection" / digest.hexdigest()[:12]


def glyph_scenes() -> Path:
    """The COCO files of ``SCENES``, written once."""
    root = cached(SCENES) / "glyphs"
    if not (root / "done").exists():
        for source, classes, n_images, split, seed in SCENES:
            write_glyph_coco(root, source, classes, n_images, split, seed)
        (root / "done").touch()
    return root


def train_seeded(cfg: Any, seed: int) -> Runner:
    """mmdet's own Runner training ``cfg`` with ``seed``."""
    cfg.randomness = dict(seed=seed)
    # No validation at the end of the loop: the bench scores the sets itself.
    cfg.train_cfg.val_begin = cfg.train_cfg.max_iters + 1
    # mmdet's config names its visualizer: every later Runner of the process would get the first one, which
    # writes into the first run's folder.
    cfg.visualizer.name = f"visualizer_{cfg.work_dir}"
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


def pretrained(glyphs: Path, iters: int, seed: int) -> Path:
    """The tiny DINO trained from scratch on the digits for ``iters`` steps, once per (data, iters, seed)."""
    out = cached(SCENES, iters, seed) / "pretrained"
    ckpt = out / f"iter_{iters}.pth"
    if not ckpt.exists():
        work = out.with_suffix(".partial")
        shutil.rmtree(work, ignore_errors=True)
        train_seeded(tiny_dino_config(glyphs, DIGITS, work, max_iters=iters), seed)
        work.rename(out)
    return ckpt


def hook_options(name: str, learn_steps: int, forget_steps: int) -> dict[str, Any]:
    """SwapHook options of row ``name`` over swap_cfg's (the tests' swap config)."""
    lengths = dict(learn_length=f"{learn_steps}steps", forget_length=f"{forget_steps}steps")
    # A joint phase is forget_length long: as long as the two phases of the other orders together.
    joint = dict(order="joint", forget_length=f"{learn_steps + forget_steps}steps")
    return {"learn_then_forget": {**lengths, "order": "learn_then_forget"},
            "forget_then_learn": {**lengths, "order": "forget_then_learn"},
            "joint": joint,
            "LoRA fine-tune R∪L": {**joint, "forget_loss": dict(beta=0.0)}}[name]


def swap_row(glyphs: Path, ckpt: Path, work: Path, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """One swap from ``ckpt`` through mmdet's Runner: the report's scores, H-mean, ``before``, phases and forget
    bounds, and the wall time."""
    cfg = swap_cfg(glyphs, ckpt, work)
    cfg.custom_hooks[0].update(options)
    start = time.perf_counter()
    train_seeded(cfg, seed)
    wall = time.perf_counter() - start
    report = json.loads((work / "swap_report.json").read_text())
    return {**report["metrics"]["after"], "hmean": report.get("hmean", 0.0), "wall_s": wall,
            "before": report["metrics"]["before"], "phases": report["metrics"]["phases"],
            "forget_bounds": report["forget_bounds"]}


class SwapSets:
    """The swap's label space and sets as ``SwapHook`` resolves them from the tests' swap config."""

    def __init__(self, glyphs: Path) -> None:
        self.cfg = swap_cfg(glyphs, "unused.pth", "unused")
        self.hook = SwapHook(**{k: v for k, v in self.cfg.custom_hooks[0].items() if k != "type"})
        self.space = LabelSpace.for_config(DIGITS, self.hook.config)
        self.sets = self.space.resolve(self.hook.config).as_dict()

    def names(self, name: str) -> list[str]:
        """The class names of set ``name``."""
        return [self.space.names[i] for i in self.sets[name]]

    def dataset(self, split: str, spec: dict, keep: list[str] | None = None) -> dict:
        """A ``SwapCocoDataset`` config over the swap config's ``split`` dataset with ``spec``'s overrides (as
        ``SwapHook._dataset_cfg``): labels by name in the joint list; with ``keep``, only those objects and the
        images showing one."""
        base = self.cfg.train_dataloader.dataset if split == "train" else self.cfg.val_dataloader.dataset
        return {**copy.deepcopy(dict(base)), **copy.deepcopy(spec), "type": "SwapCocoDataset", "keep_classes": keep,
                "metainfo": dict(classes=tuple(self.space.names))}

    def scorer(self) -> SetScorer:
        """The scorer SwapHook builds (``_build_data``): the sets' test images, every labelled object kept."""
        digits = DATASETS.build(self.dataset("val", {}))
        learn = DATASETS.build(self.dataset("val", self.hook.specs["learn"]["val"]))
        return SetScorer({"forget": digits, "retain": digits, "learn": learn}, self.sets, self.space.names,
                         self.cfg.val_dataloader.batch_size)


def oracle_row(glyphs: Path, work: Path, iters: int, seed: int) -> dict[str, Any]:
    """The tiny DINO trained from scratch on R ∪ L (the swap's retain and learn training sets) in the joint class
    list with mmdet's Runner, scored by the swap's scorer."""
    swap = SwapSets(glyphs)
    cfg = tiny_dino_config(glyphs, swap.space.names, work, max_iters=iters)
    cfg.train_dataloader.dataset = dict(type="ConcatDataset", datasets=[
        swap.dataset("train", {}, swap.names("retain")),
        swap.dataset("train", swap.hook.specs["learn"]["train"], swap.names("learn"))])
    start = time.perf_counter()
    runner = train_seeded(cfg, seed)
    scores = swap.scorer()(runner.model)
    return {**scores, "wall_s": time.perf_counter() - start}


def one_seed(seed: int, rows: list[str], glyphs: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Pretraining (cached), every swap row and the oracle for ``seed``."""
    start = time.perf_counter()
    ckpt = pretrained(glyphs, args.pretrain_iters, seed)
    pretrain_s = time.perf_counter() - start
    out: dict[str, Any] = {}
    for name in rows:
        print(f"seed {seed}: running {name} ...", flush=True)
        work = tmp / f"seed{seed}" / name.replace(" ", "_").replace("∪", "u")
        out[name] = swap_row(glyphs, ckpt, work, seed, hook_options(name, args.learn_steps, args.forget_steps))
    print(f"seed {seed}: running the oracle ...", flush=True)
    out[ORACLE] = oracle_row(glyphs, tmp / f"seed{seed}" / "oracle", args.pretrain_iters, seed)
    before = next(iter(out.values()))["before"] if rows else None
    if before is not None:
        out[ORACLE]["hmean"] = swap_hmean(before, out[ORACLE])
    return {"pretrained": before, "pretrain_wall_s": pretrain_s, "rows": out}


def table(per_seed: dict[str, dict]) -> list[str]:
    header = (f"{'seed':<6}{'row':<28}{'forget ↓':>10}{'forget_any':>12}{'retain ↑':>10}{'learn ↑':>10}"
              f"{'H-mean':>9}{'wall s':>9}")
    lines = [header, "-" * len(header)]
    for seed, result in per_seed.items():
        pre = result["pretrained"]
        if pre is not None:
            lines.append(f"{seed:<6}{'pretrained':<28}{pre['forget']:>10.2f}{pre['forget_any']:>12.2f}"
                         f"{pre['retain']:>10.2f}{pre['learn']:>10.2f}{'':>9}{result['pretrain_wall_s']:>9.0f}")
        for name, row in result["rows"].items():
            lines.append(f"{seed:<6}{name:<28}" + "".join(f"{row[k]:>{w}.2f}" for k, w in zip(
                (*SCORES, "hmean"), (10, 12, 10, 10, 9), strict=True)) + f"{row['wall_s']:>9.0f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="pretraining and swap seeds")
    parser.add_argument("--pretrain-iters", type=int, default=400, help="pretraining (and oracle) steps")
    parser.add_argument("--learn-steps", type=int, default=100)
    parser.add_argument("--forget-steps", type=int, default=100)
    parser.add_argument("--rows", nargs="*", default=ROWS, choices=ROWS)
    parser.add_argument("--note", default="", help="e.g. whether other work ran on the machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_detection.json"))
    args = parser.parse_args()
    register_all_modules()
    start = time.perf_counter()
    info = machine(args.note)
    glyphs = glyph_scenes()
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = {str(seed): one_seed(seed, args.rows, glyphs, args, Path(tmp)) for seed in args.seeds}
    info["load_average_at_end"] = list(os.getloadavg())
    lines = table(per_seed)
    sets = SwapSets(glyphs)
    print("\n".join(lines))
    setup = {"model": "tests/swap_testing/tiny_dino.py: mmdet's DINO-4scale config, ResNet-18 trunk, 1 encoder / "
                      "2 decoder layers, 30 queries, 96x96 inputs, batch 4",
             "data": [dict(zip(("source", "classes", "images", "split", "seed"), s, strict=True)) for s in SCENES],
             "sets": {name: sets.names(name) for name in ("forget", "retain", "learn")},
             "pretrain": f"{args.pretrain_iters} steps from scratch on the digits, mmdet Runner, AdamW lr 2e-4",
             "swap": f"tests' swap_cfg (SwapHook detection preset, AdamW lr 2e-3 on LoRA, clip 1); learn "
                     f"{args.learn_steps} + forget {args.forget_steps} steps, joint "
                     f"{args.learn_steps + args.forget_steps}",
             "mmdet": mmdet.__version__}
    command = f"python bench/swap_detection.py {shlex.join(sys.argv[1:])}".strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": command, "machine": info, "setup": setup, "seeds": args.seeds,
        "pretrain_iters": args.pretrain_iters, "learn_steps": args.learn_steps, "forget_steps": args.forget_steps,
        "wall_s": time.perf_counter() - start, "per_seed": per_seed, "table": lines}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
