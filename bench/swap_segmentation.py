"""Swap quality on semantic segmentation with the detectron2 host: orders, LoRA fine-tuning and the oracle.

The model is Mask2Former-shaped (``GlyphMask2Former`` below: the tests' ``MiniMask2Former`` with Mask2Former's
query-to-pixel cross-attention and Hungarian matching), pretrained with plain detectron2 on the tests' real glyph scenes
(``tests/swap_testing/d2_models.py``, ``glyph_coco.py``: 64-pixel images of real MNIST digits; background and 0-3).
Each row is one run of the tests' swap (``swap_glyphs``: forget digit 3, retain background and 0-2, learn
Fashion-MNIST trouser and bag) from the same pretrained weights, data and seed, through the user's trainer with
``SwapTrainerMixin``, at ``SWAP.SOLVER.BASE_LR`` ``--lr`` and a relative forgetting bound (``--bnd`` times the
forget loss at the phase start: this model's loss is not Mask2Former's, the preset's absolute 115 means nothing
here); its scores are the per-set mIoU of the ``swap_report.json`` it writes:

- learn_then_forget (``SWAP.ORDER``'s default), forget_then_learn;
- joint: one phase of learn + forget iterations (the same number of steps);
- LoRA fine-tune on R and L: the joint run with ``SWAP.FORGET_LOSS.BETA 0`` (no forgetting term; the forget batch
  is still drawn and weighted 0);
- oracle: the same model trained from scratch with plain detectron2 on R ∪ L only, in the joint label space (the
  swap's own role datasets and label tables: forget-class pixels ignored), as many iterations as pretraining,
  scored by the swap's ``score_sets``.

The pretrained model and the glyph scenes are cached under ``$KSWAP_CACHE`` (default ``~/.cache/kswap``), keyed by
the pretraining settings and the sources that draw them.

Usage: ``python bench/swap_segmentation.py [--pretrain-iters 2000] [--learn-iters 200] [--forget-iters 200]
[--lr 1e-3] [--bnd 3] [--seed 0] [--rows ...] [--note "..."] [--out bench/results/swap_segmentation.json]``
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import detectron2
import numpy as np
import torch
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.env import seed_all_rng
from scipy.optimize import linear_sum_assignment
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(ROOT / "demo"), str(ROOT / "tests")]

from step_overhead import machine  # noqa: E402

from detectron2_swap import SwapPlan, remap_sample, score_sets  # noqa: E402
from detectron2_swap.plan import SOURCE_KEY, swap_dataset_name  # noqa: E402

from prepare_data import CACHE  # noqa: E402
from swap_testing import d2_models, glyph_coco  # noqa: E402
from swap_testing.d2_models import (  # noqa: E402
    MiniMask2Former,
    SetCriterion,
    glyph_cfg,
    make_trainer_classes,
    register_datasets,
    run_swap,
    swap_glyphs,
    write_glyph_spec,
)

MODEL = "GlyphMask2Former"
ROWS: dict[str, dict[str, Any]] = {
    "learn_then_forget": {"ORDER": "learn_then_forget"},
    "forget_then_learn": {"ORDER": "forget_then_learn"},
    "joint": {"ORDER": "joint"},
    "LoRA fine-tune on R and L": {"ORDER": "joint", "FORGET_LOSS__BETA": 0.0},
}
ORACLE = "oracle (R ∪ L from scratch)"
SETS = ("forget", "retain", "learn")


class CrossAttention(nn.Module):
    """Mask2Former's post-norm cross-attention layer (``multihead_attn``, ``norm``): queries read the pixels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return self.norm(queries + self.multihead_attn(queries, pixels, pixels, need_weights=False)[0])


class MatchedCriterion(SetCriterion):
    """``SetCriterion`` with Mask2Former's Hungarian matching in place of its fixed assignment.

    ``SetCriterion`` gives the j-th class present in an image to query j. A forget image keeps only the forget
    class (the other pixels ignored), so its "3" lands on query 0, the query that carries the background elsewhere:
    the forget loss then rises by moving query 0 off "3" while the 3s' pixels stay as they were. Here each
    image's queries are reordered so that the query matched to the j-th class (class probability plus mask dice
    cost, as Mask2Former's matcher) comes j-th, and the fixed assignment does the rest.
    """

    def forward(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[torch.Tensor],
                ignore: int) -> dict[str, torch.Tensor]:
        order = torch.stack([self.match(*image, ignore) for image in zip(class_logits, mask_logits, targets,
                                                                             strict=True)])
        rows = torch.arange(len(order)).unsqueeze(1)
        return super().forward(class_logits[rows, order], mask_logits[rows, order], targets, ignore)

    @torch.no_grad()
    def match(self, logits: torch.Tensor, masks: torch.Tensor, sem_seg: torch.Tensor, ignore: int) -> torch.Tensor:
        """The query order of one image: its matched queries by class (ascending ids, as present), then the rest."""
        present = [c for c in sem_seg.unique().tolist() if c != ignore][: len(logits)]
        valid = sem_seg != ignore
        prob = masks[:, valid].sigmoid()  # (queries, valid pixels)
        target = torch.stack([(sem_seg[valid] == c).float() for c in present], 1) if present else prob[:, :0]
        dice = 1 - (2 * prob @ target + 1) / (prob.sum(1, keepdim=True) + target.sum(0) + 1)
        cost = dice - logits.softmax(-1)[:, present]
        queries, classes = linear_sum_assignment(cost.cpu().numpy())
        matched = queries[np.argsort(classes)].tolist()
        return torch.tensor(matched + [q for q in range(len(logits)) if q not in matched], device=logits.device)


@META_ARCH_REGISTRY.register()
class GlyphMask2Former(MiniMask2Former):
    """``MiniMask2Former`` with two parts of Mask2Former it lacks: decoder layers that start with cross-attention to
    the pixel-decoder tokens (``predictor.transformer_cross_attention_layers``; no LoRA there, as in the preset)
    and Hungarian matching (``MatchedCriterion``).

    ``MiniMask2Former``'s queries never see the image, so its class logits are the same for every image: trained
    1500 iterations on the digits it scores one digit class at a time (digit IoUs 0-26). Both belong in
    ``d2_models.MiniMask2Former`` (the tests are not edited from here).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        predictor = self.sem_seg_head.predictor
        predictor.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttention(cfg.MODEL.GLYPH.DIM) for _ in predictor.transformer_ffn_layers)
        self.criterion = MatchedCriterion(self.criterion.num_classes)

    def _decode(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        predictor = self.sem_seg_head.predictor
        for cross, layer in zip(predictor.transformer_cross_attention_layers, predictor.transformer_ffn_layers,
                                strict=True):
            queries = layer(cross(queries, tokens))
        return queries


def cache_key(*code: object, **settings: Any) -> str:
    """A short hash of ``settings``, the source of ``code`` and of the tests' model and data modules (what made a
    cached file)."""
    sources = "".join(inspect.getsource(c) for c in (d2_models, glyph_coco, *code))
    return hashlib.sha256((json.dumps(settings, sort_keys=True) + sources).encode()).hexdigest()[:12]


def glyph_data() -> Path:
    """The tests' four glyph datasets, written once into the cache and registered."""
    root = CACHE / "swap_segmentation" / f"glyphs-{cache_key()}"
    spec = root / "datasets.json"
    if not spec.exists():
        write_glyph_spec(root)
    register_datasets(json.loads(spec.read_text()))
    return spec


def train_plain(cfg, iters: int, seed: int, trainer_class: type) -> tuple[Any, float]:
    """Plain detectron2 training of ``cfg`` for ``iters`` iterations from scratch; the trainer and wall seconds."""
    cfg.SOLVER.MAX_ITER = iters
    seed_all_rng(seed)
    start = time.perf_counter()
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return trainer, time.perf_counter() - start


def pretrained(iters: int, seed: int) -> tuple[Path, float]:
    """The model pretrained on the digits (background, 0-3), cached; its path and the wall seconds it took."""
    key = cache_key(CrossAttention, MatchedCriterion, GlyphMask2Former, iters=iters, seed=seed)
    out = CACHE / "swap_segmentation" / f"{MODEL}-{iters}it-seed{seed}-{key}"
    if not (out / "model_final.pth").exists():
        partial = out.with_name(out.name + ".partial")
        _, wall = train_plain(glyph_cfg(str(partial), meta=MODEL), iters, seed, make_trainer_classes()[0])
        (partial / "pretrain_wall.json").write_text(json.dumps({"wall_s": wall}))
        partial.rename(out)
    return out / "model_final.pth", json.loads((out / "pretrain_wall.json").read_text())["wall_s"]


def swap_cfg(out: Path, weights: Path, args: argparse.Namespace, **swap: Any):
    """The tests' swap of the glyph model, with this bench's phase lengths, LR and relative forgetting bound."""
    joint = swap.get("ORDER") == "joint"
    return swap_glyphs(glyph_cfg(str(out), meta=MODEL), weights, learn=args.learn_iters,
                       forget=args.learn_iters + args.forget_iters if joint else args.forget_iters,
                       SOLVER__BASE_LR=args.lr, FORGET_LOSS__BND=args.bnd, FORGET_LOSS__BND_RELATIVE=True, **swap)


def swap_row(out: Path, weights: Path, args: argparse.Namespace, swap: dict[str, Any]) -> dict[str, Any]:
    """One swap run; its report's scores before and after, forget bounds and wall seconds."""
    start = time.perf_counter()
    run_swap(swap_cfg(out, weights, args, **swap))
    wall = time.perf_counter() - start
    report = json.loads((out / "swap_report.json").read_text())
    return {**report["metrics"]["after"], "wall_s": wall, "before": report["metrics"]["before"],
            "hmean": report.get("hmean"), "phases": {p["name"]: p["after"] for p in report["metrics"]["phases"]},
            "forget_bounds": report["forget_bounds"], "swap": swap}


def oracle_row(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The model trained from scratch on R ∪ L (joint label space, forget pixels ignored), scored per set; the
    wall seconds count training and scoring, as a swap row's do."""
    start = time.perf_counter()
    plan = SwapPlan.from_cfg(swap_cfg(out, out / "unused.pth", args))
    sources = ("retain", "learn")
    tables = plan.register_role_datasets(sources)
    plain = make_trainer_classes()[0]

    class OracleTrainer(plain):
        @classmethod
        def build_train_loader(cls, cfg):
            # The swap's own move into the joint label space (SwapDataLoader's), after the user's mapper.
            return ([remap_sample(s, tables[s[SOURCE_KEY]], plan.ignore_value) for s in batch]
                    for batch in super().build_train_loader(cfg))

    cfg = glyph_cfg(str(out), meta=MODEL, num_classes=plan.space.num_classes)
    cfg.DATASETS.TRAIN = tuple(swap_dataset_name(d, sources) for d in tables)
    trainer, _ = train_plain(cfg, args.pretrain_iters, args.seed, OracleTrainer)
    scores = score_sets(trainer.model.eval(), plan, lambda name: plain.build_test_loader(cfg, name),
                        distributed=False)
    return {**scores, "wall_s": time.perf_counter() - start}


def table(pretrained_scores: dict[str, float], rows: dict[str, dict]) -> list[str]:
    lines = ["| row | forget mIoU ↓ | retain mIoU ↑ | learn mIoU ↑ | wall s |", "|---|---:|---:|---:|---:|",
             "| pretrained | " + " | ".join(f"{pretrained_scores[s]:.1f}" for s in SETS) + " | |"]
    lines += [f"| {name} | " + " | ".join(f"{r[s]:.1f}" for s in SETS) + f" | {r['wall_s']:.0f} |"
              for name, r in rows.items()]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-iters", type=int, default=2000, help="pretraining and oracle iterations")
    parser.add_argument("--learn-iters", type=int, default=200)
    parser.add_argument("--forget-iters", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3, help="SWAP.SOLVER.BASE_LR (the reference: 1e-4)")
    parser.add_argument("--bnd", type=float, default=3.0,
                        help="SWAP.FORGET_LOSS.BND, relative: a multiple of the forget loss at the phase start")
    parser.add_argument("--seed", type=int, default=0, help="pretraining and oracle seed (swaps: run_swap's 0)")
    parser.add_argument("--rows", nargs="*", default=[*ROWS, ORACLE], choices=[*ROWS, ORACLE])
    parser.add_argument("--note", default="", help="e.g. whether other work ran on the machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_segmentation.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    info = {**machine(args.note), "detectron2": detectron2.__version__}
    glyph_data()
    weights, pretrain_wall = pretrained(args.pretrain_iters, args.seed)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.rows):
            print(f"running {name} ...", flush=True)
            out = Path(tmp) / f"row{i}"
            rows[name] = oracle_row(out, args) if name == ORACLE else swap_row(out, weights, args, ROWS[name])
    before = next((r["before"] for r in rows.values() if "before" in r), None)
    lines = table(before, rows) if before else []
    print("\n".join(lines))
    result = {"command": f"python bench/swap_segmentation.py {shlex.join(sys.argv[1:])}".strip(), "machine": info,
              "model": f"{MODEL} (bench/swap_segmentation.py: tests/swap_testing/d2_models.py MiniMask2Former with "
                       "cross-attention and Hungarian matching), glyph_cfg: 64-pixel inputs, DIM 32",
              "seed": args.seed, "swap_seed": 0, "pretrain_iters": args.pretrain_iters,
              "pretrain_wall_s": pretrain_wall, "pretrained": before,
              "learn_iters": args.learn_iters, "forget_iters": args.forget_iters,
              "joint_iters": args.learn_iters + args.forget_iters, "swap_lr": args.lr, "relative_bnd": args.bnd,
              "rows": rows,
              "total_wall_s": time.perf_counter() - start, "table": lines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
