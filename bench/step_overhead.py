"""Per-step overhead of the swap in each host: one swap step against one plain training step on the same images.

Both steps run on the same model instance, optimizer and images, in one process: warm-up steps of each first, then
``--repeats`` rounds of one step each (the order alternating between rounds); the medians and their ratio (swap /
plain) go to ``bench/results/step_overhead_<host>.json``, with the quartiles, the command and the machine.

* ``timm``: the demo's ViT (MNIST -> Fashion-MNIST, four classes grown, LoRA on the FFNs). Swap step: a forget-phase
  step, the retain (R') and forget (F) batches of 80 real MNIST images each through one forward, ``PhaseLoss`` with
  the bounded forgetting term and group sparsity. Plain step: LoRA fine-tuning (cross-entropy) on the same 160
  images.
* ``mmdet``: the tests' tiny DINO (``tests/swap_testing/tiny_dino.py``: mmdet's own DINO-4scale config with a
  ResNet-18 trunk, one encoder and two decoder layers, 96x96 glyph images from ``tests/swap_testing/glyph_coco.py``),
  made a swap detector with
  ``mmdet_swap``'s own pieces as ``SwapHook.before_run`` does (grown classes, LoRA, frozen base,
  ``make_swap_detector``). Swap step: ``model.train_step`` of the merged role-tagged forget-phase batch (the
  config's batch size per role) as ``SwapTrainLoop`` runs it; plain step: ``model.train_step`` of the same
  images untagged (the detector's own loss over one batch). Both through the swap config's optimizer wrapper.
  ``--models stock_dino``: mmdet's DINO-4scale R50 model as shipped (900 queries), the images resized to 256x256.
* ``detectron2``: the tests' small Mask2Former-shaped model (``--d2-model MiniMask2Former``, the default) or
  GlyphViT ``SemanticSegmentor`` (``tests/swap_testing/d2_models.py``), built by the swap trainer's
  ``build_model``. Swap
  step: detectron2's ``SimpleTrainer.run_step`` over a forget-phase batch from ``SwapDataLoader`` (role-tagged
  samples: the model's forward splits them and returns ``{"loss_swap": total}``); plain step: the same trainer
  step over the same samples untagged (the model's original forward and loss dict).

Weights are random for mmdet and detectron2 (timing only); timm loads the demo's pretrained checkpoint. Set
``OMP_NUM_THREADS`` (recorded) and say in ``--note`` whether the machine was otherwise idle.

Results go under the model's name in the host's file, next to those of models not run this time.

Usage: ``python bench/step_overhead.py --host {timm,mmdet,detectron2} [--models NAME ...] [--repeats 30]
[--warmup 3] [--note "..."] [--out PATH]`` (models: timm ``demo_vit``; mmdet ``tiny_dino`` (default),
``stock_dino``; detectron2 ``MiniMask2Former`` (default), ``SemanticSegmentor``)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[1:1] = [str(ROOT / "demo"), str(ROOT / "tests")]

Step = Callable[[], None]


@dataclass
class StepPair:
    """A host's swap step and plain step over the same images, what they are, and the context both run in."""

    swap: Step
    plain: Step
    setup: dict[str, Any]
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)


def time_interleaved(pair: StepPair, repeats: int, warmup: int = 5) -> dict[str, Any]:
    """Median wall time of each step over ``repeats`` interleaved rounds, after ``warmup`` steps of each."""
    steps = {"swap": pair.swap, "plain": pair.plain}
    times: dict[str, list[float]] = {name: [] for name in steps}
    with pair.context:
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        for round_ in range(repeats):
            # Alternating the order keeps a slower first or second slot of a round out of the ratio.
            for name in (("swap", "plain") if round_ % 2 == 0 else ("plain", "swap")):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    out: dict[str, Any] = {}
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        out[f"{name}_step_ms"] = 1000 * statistics.median(values)
        out[f"{name}_step_ms_quartiles"] = [1000 * q1, 1000 * q3]
    out["ratio"] = out["swap_step_ms"] / out["plain_step_ms"]
    return {**out, "repeats": repeats, "warmup": warmup}


# -- timm ---------------------------------------------------------------------------------------------------------

def mnist_images(root: Path, digits: list[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of the demo's MNIST ImageFolder ``root/val`` drawn evenly from ``digits``, and their labels."""
    import numpy as np
    from PIL import Image

    files = [(f, int(d)) for d in digits for f in sorted((root / "val" / d).iterdir())[: -(-n // len(digits))]]
    files = files[:: max(1, len(files) // n)][:n]
    pixels = np.stack([np.asarray(Image.open(f).convert("L"), np.float32) / 255.0 for f, _ in files])
    return (torch.from_numpy(pixels)[:, None] - 0.5) / 0.5, torch.tensor([label for _, label in files])


def timm_steps(ckpt: Path, roots: dict[str, Path]) -> StepPair:
    """The demo's swap step in the forget phase against a plain LoRA fine-tuning step on the same 160 images."""
    import timm
    from torch.nn import functional as F

    from kswap import (
        LoraSettings,
        LossWeights,
        PhaseLoss,
        extend_head,
        freeze_all_but_lora_,
        group_sparse_loss,
        inject_lora,
        lora_groups,
    )

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", patch_size=7, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2,
                              img_size=28, in_chans=1, num_classes=10, checkpoint_path=str(ckpt))
    model.head = extend_head(model.head, 4)
    inject_lora(model, LoraSettings(targets="timm_vit"))
    freeze_all_but_lora_(model)
    groups = lora_groups(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    retain_x, retain_y = mnist_images(roots["mnist"], [str(d) for d in range(2, 10)], 80)
    forget_x, forget_y = mnist_images(roots["mnist"], ["0", "1"], 80)
    x, y = torch.cat([retain_x, forget_x]), torch.cat([retain_y, forget_y])
    loss_fn = PhaseLoss(LossWeights(beta=0.2, bnd=105.0, alpha=0.005))

    def swap_step() -> None:
        logits = model(x).split([len(retain_y), len(forget_y)])
        out = loss_fn({"retain": F.cross_entropy(logits[0], retain_y), "forget": F.cross_entropy(logits[1], forget_y)},
                      gs=group_sparse_loss(groups))
        opt.zero_grad()
        out.total.backward()
        opt.step()

    def plain_step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return StepPair(swap_step, plain_step, {
        "model": "the demo's ViT (4 blocks, dim 64, 28x28 MNIST), head grown by 4, LoRA on the FFNs",
        "images": "160 real MNIST val images: 80 retain digits (2-9) and 80 forget digits (0, 1)",
        "swap": "forget-phase step: R' and F batches through one forward, PhaseLoss (bounded forget term, group "
                "sparsity), AdamW over LoRA",
        "plain": "LoRA fine-tuning step: cross-entropy over the same 160 images, same optimizer"})


def build_timm(work: Path, model: str) -> StepPair:
    from prepare_data import prepare
    from swap_mnist import pretrained_checkpoint

    roots = prepare(per_class_train=1000, per_class_val=300)
    return timm_steps(pretrained_checkpoint(roots["mnist"]), roots)


# -- mmdet ----------------------------------------------------------------------------------------------------------

DINO_MODELS = {"tiny_dino": "tests/swap_testing/tiny_dino.py: mmdet's dino-4scale_r50_8xb2-12e_coco.py with a "
                             "ResNet-18 trunk, 1 encoder and 2 decoder layers, 30 queries, batch 4 per role, "
                             "96x96 inputs",
               "stock_dino": "mmdet's dino-4scale_r50_8xb2-12e_coco.py model as shipped (ResNet-50, 6+6 layers, 900 "
                             "queries), batch 2 per role, inputs resized to 256x256"}
STOCK_DINO_SIZE = 256


def build_mmdet(work: Path, model: str) -> StepPair:
    """The tiny (or stock) DINO made a swap detector as ``SwapHook.before_run`` does; train_step of a merged
    role-tagged forget-phase batch against train_step of the same images untagged."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

    from kswap import LabelSpace, PhaseKind, freeze_all_but_lora_, inject_lora, lora_groups, plan_phases
    from mmdet_swap import SwapHook
    from mmdet_swap.detector import extend_dino_classes, make_swap_detector
    from mmdet_swap.loop import merge_batches

    from swap_testing.glyph_coco import write_glyph_coco
    from swap_testing.tiny_dino import DIGITS, DINO_CONFIG, swap_cfg

    register_all_modules()
    torch.manual_seed(0)
    cfg = swap_cfg(work, work / "no_checkpoint.pth", work / "run")
    if model == "stock_dino":  # mmdet's own DINO-4scale R50 model and batch size, on the tests' small images
        cfg.model = Config.fromfile(str(DINO_CONFIG)).model
        cfg.model.backbone.init_cfg = None  # no download: timing only
        cfg.model.bbox_head.num_classes = len(DIGITS)
        cfg.train_dataloader.batch_size = 2
        for transform in cfg.train_dataloader.dataset.pipeline:  # 900 queries need that many encoder tokens
            if transform["type"] == "Resize":
                transform["scale"] = (STOCK_DINO_SIZE, STOCK_DINO_SIZE)
    hook = SwapHook(**{k: v for k, v in cfg.custom_hooks[0].items() if k != "type"})
    space = LabelSpace.for_config(DIGITS, hook.config)
    sets = space.resolve(hook.config).as_dict()
    detector = MODELS.build(cfg.model)
    extend_dino_classes(detector, len(space.new))
    inject_lora(detector, hook.config.lora)
    freeze_all_but_lora_(detector)
    forget_phase = next(p for p in plan_phases(hook.config) if p.kind is PhaseKind.FORGET)
    make_swap_detector(detector, lambda: forget_phase.loss, lora_groups(detector, hook.config.lora.group_by))
    wrapper = copy.deepcopy(cfg.optim_wrapper)
    wrapper.pop("paramwise_cfg", None)
    wrapper["optimizer"] = OPTIMIZERS.build({**wrapper.pop("optimizer"),
                                             "params": [p for p in detector.parameters() if p.requires_grad]})
    optim_wrapper = OPTIM_WRAPPERS.build(wrapper)

    batch = cfg.train_dataloader.batch_size
    write_glyph_coco(work, "mnist", DIGITS, 8 * batch, "train", 0)
    samples = {}
    for role in ("retain", "forget"):  # each role's images hold objects of its set (SwapCocoDataset keep_classes)
        dataset = DATASETS.build({**copy.deepcopy(dict(cfg.train_dataloader.dataset)), "type": "SwapCocoDataset",
                                  "metainfo": dict(classes=space.names),
                                  "keep_classes": [space.names[i] for i in sets[role]]})
        samples[role] = [dataset[i] for i in range(batch)]
    plain_batch = pseudo_collate(copy.deepcopy(samples["retain"] + samples["forget"]))
    swap_batch = merge_batches({role: pseudo_collate(s) for role, s in samples.items()})

    def step(data: dict) -> Step:
        def run() -> None:
            detector.train()
            detector.train_step(data, optim_wrapper=optim_wrapper)
        return run

    return StepPair(step(swap_batch), step(plain_batch), {
        "model": (DINO_MODELS[model] + "; 96x96 glyph images; 3 digit classes grown by 2; LoRA (detection preset) "
                  "on the FFNs; random weights"),
        "images": f"{2 * batch} real glyph images (tests/swap_testing/glyph_coco.py): {batch} holding retain digits, "
                  f"{batch} holding the forget digit",
        "swap": "model.train_step of merge_batches({retain, forget}) (SwapTrainLoop's step): the swap detector runs "
                "backbone, neck and transformer once over the merged batch, the head's loss per role on its rows, "
                "and combines them with PhaseLoss (forget phase)",
        "plain": "model.train_step of the same images untagged: the detector's own loss over one batch",
        "optimizer": "the swap config's AdamW over LoRA, clip_grad max_norm 1"})


# -- detectron2 -----------------------------------------------------------------------------------------------------

class RoleLoaders:
    """The host side of a swap session that only draws batches: its role loaders, nothing to do at a phase start."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def role_loader(self, phase: Any, role: str, sets: tuple[str, ...]) -> Any:
        return self.loader.role_loader(sets)

    def start_phase(self, phase: Any) -> None:
        pass


def build_detectron2(work: Path, model: str) -> StepPair:
    """The swap trainer's model and optimizer; detectron2's SimpleTrainer step over a role-tagged forget-phase
    batch from SwapDataLoader against the same step over the same samples untagged."""
    from detectron2.engine import SimpleTrainer
    from detectron2.utils.events import EventStorage

    from detectron2_swap import SwapDataLoader, SwapPlan
    from detectron2_swap.model import every_term
    from kswap import ROLE_KEY, Order, PreparedModel, SwapSession

    from swap_testing.d2_models import glyph_cfg, make_trainer_classes, swap_glyphs, write_glyph_spec

    write_glyph_spec(work)
    torch.manual_seed(0)
    cfg = swap_glyphs(glyph_cfg(str(work), meta=model), work / "no_checkpoint.pth")
    _, swap_trainer = make_trainer_classes()
    net = swap_trainer.build_model(cfg)
    optimizer = swap_trainer.build_optimizer(cfg, net)
    plan = SwapPlan.from_cfg(cfg)
    batch = cfg.SWAP.IMS_PER_BATCH or cfg.SOLVER.IMS_PER_BATCH
    loader = SwapDataLoader(plan, lambda datasets: swap_trainer.users_train_loader(cfg, datasets, batch))
    # A session whose first phase forgets, outside a trainer: it gives the loader its role batches and the model
    # its phase loss, as a SwapHook's does.
    state = net.swap_state
    session = SwapSession(dataclasses.replace(plan.config, order=Order.FORGET_THEN_LEARN), RoleLoaders(loader),
                          PreparedModel(net, state.grown, state.groups, state.adapted), is_loss=every_term)
    state.loss = session.phase_loss
    loader.bind(session)
    swap_batch = next(iter(loader))
    plain_batch = [{k: v for k, v in sample.items() if k != ROLE_KEY} for sample in swap_batch]
    net.train()
    swap, plain = (SimpleTrainer(net, itertools.repeat(b), optimizer) for b in (swap_batch, plain_batch))
    roles = [sample[ROLE_KEY] for sample in swap_batch]
    return StepPair(swap.run_step, plain.run_step, {
        "model": f"tests/swap_testing/d2_models.py {model} (glyph_cfg, 64-pixel inputs), built by the swap trainer's "
                 "build_model (class head grown, LoRA by the swap config, base frozen); random weights",
        "images": f"{len(swap_batch)} real glyph images (tests/swap_testing/glyph_coco.py) from SwapDataLoader's "
                  "forget phase: "
                  f"{roles.count('retain')} retain-side, {roles.count('forget')} forget (the user's mapper; "
                  "targets in the joint label space, restricted to each role's classes)",
        "swap": "SimpleTrainer.run_step over the role-tagged batch: the swap model's forward splits it by role and "
                "returns {'loss_swap': PhaseLoss total}, logging each term",
        "plain": "SimpleTrainer.run_step over the same samples untagged: the model's own forward and loss dict",
        "optimizer": "the tests' user Trainer.build_optimizer: AdamW over the trainable (LoRA) parameters"},
        context=EventStorage(0))


# -- entry point ----------------------------------------------------------------------------------------------------

# Per host, its builder and the models it can time (the first is the default).
HOSTS: dict[str, tuple[Callable[[Path, str], StepPair], tuple[str, ...]]] = {
    "timm": (build_timm, ("demo_vit",)),
    "mmdet": (build_mmdet, tuple(DINO_MODELS)),
    "detectron2": (build_detectron2, ("MiniMask2Former", "SemanticSegmentor")),
}
GOAL = 1.10


def machine(note: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average_at_start": list(os.getloadavg()), "note": note}


def table(runs: dict[str, dict[str, Any]]) -> list[str]:
    rows = [f"{'model':<20}{'swap ms':>10}{'plain ms':>10}{'ratio':>8}{'repeats':>9}"]
    rows += [f"{name:<20}{r['swap_step_ms']:>10.1f}{r['plain_step_ms']:>10.1f}{r['ratio']:>8.3f}{r['repeats']:>9}"
             for name, r in runs.items()]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, choices=list(HOSTS))
    parser.add_argument("--models", nargs="*", default=None,
                        help=f"default: the host's first; {', '.join(f'{h}: {m}' for h, (_, m) in HOSTS.items())}")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--note", default="", help="e.g. whether other work ran on the machine")
    parser.add_argument("--out", default=None, help="default: bench/results/step_overhead_<host>.json")
    args = parser.parse_args()
    build, known = HOSTS[args.host]
    models = args.models or list(known[:1])
    if unknown := sorted(set(models) - set(known)):
        parser.error(f"--host {args.host} has no model {unknown}; it has {list(known)}")
    out = Path(args.out or ROOT / "bench" / "results" / f"step_overhead_{args.host}.json")
    # Each model's entry replaces its previous one; the others' stay.
    runs = json.loads(out.read_text())["models"] if out.exists() else {}
    command = f"python bench/step_overhead.py {shlex.join(sys.argv[1:])}"
    # One folder for all models: detectron2's catalog keeps the datasets registered by the first.
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            info = machine(args.note)
            pair = build(Path(tmp), name)
            result = time_interleaved(pair, args.repeats, args.warmup)
            info["load_average_at_end"] = list(os.getloadavg())
            runs[name] = {"command": command, "machine": info, "setup": pair.setup, **result}
            print(f"{name}: swap {result['swap_step_ms']:.1f} ms (quartiles {result['swap_step_ms_quartiles']}), "
                  f"plain {result['plain_step_ms']:.1f} ms ({result['plain_step_ms_quartiles']}), ratio "
                  f"{result['ratio']:.3f}", flush=True)
    rows = table(runs)
    print("\n".join(rows))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"host": args.host, "goal_ratio": GOAL, "models": runs, "table": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
