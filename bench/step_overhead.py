"""Per-step overhead of the swap in each host: one swap step against one plain training step on the same images.

Both steps run on the same model instance, optimizer and images, in one process: warm-up steps of each first, then
``--repeats`` rounds of one step each (the order alternating between rounds); the medians and their ratio (swap /
plain) go to ``bench/results/step_overhead_<host>.json``, with the quartiles, the command and the machine.

* ``timm``: the demo's ViT (MNIST -> Fashion-MNIST, four classes grown, LoRA on the FFNs). Swap step: a forget-phase
  step, the retain (R') and forget (F) batches of 80 real MNIST images each through one forward, ``PhaseLoss`` with
  the bounded forgetting term and group sparsity. Plain step: LoRA fine-tuning (cross-entropy) on the same 160
  images.
* ``mmdet``: the tests' tiny DINO (``tests/tiny_dino.py``: mmdet's own DINO-4scale config with a ResNet-18 trunk,
  one encoder and two decoder layers, 96x96 glyph images from ``tests/glyph_coco.py``), made a swap detector with
  ``mmdet_swap``'s own pieces as ``SwapHook.before_run`` does (grown classes, LoRA, frozen base,
  ``make_swap_detector``). Swap step: ``model.train_step`` of the merged role-tagged forget-phase batch (the
  config's batch size per role) as ``SwapTrainLoop`` runs it; plain step: ``model.train_step`` of the same
  images untagged (the detector's own loss over one batch). Both through the swap config's optimizer wrapper.
* ``detectron2``: the tests' small Mask2Former-shaped model (``--d2-model MiniMask2Former``, the default) or
  GlyphViT ``SemanticSegmentor`` (``tests/d2_models.py``), built by the swap trainer's ``build_model``. Swap
  step: detectron2's ``SimpleTrainer.run_step`` over a forget-phase batch from ``SwapDataLoader`` (role-tagged
  samples: the model's forward splits them and returns ``{"loss_swap": total}``); plain step: the same trainer
  step over the same samples untagged (the model's original forward and loss dict).

Weights are random for mmdet and detectron2 (timing only); timm loads the demo's pretrained checkpoint. Set
``OMP_NUM_THREADS`` (recorded) and say in ``--note`` whether the machine was otherwise idle.

Usage: ``python bench/step_overhead.py --host {timm,mmdet,detectron2} [--repeats 30] [--warmup 3] [--note "..."]
[--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
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


def build_timm(work: Path) -> StepPair:
    from prepare_data import prepare
    from swap_mnist import pretrained_checkpoint

    roots = prepare(per_class_train=1000, per_class_val=300)
    return timm_steps(pretrained_checkpoint(roots["mnist"]), roots)


# -- entry point ----------------------------------------------------------------------------------------------------

HOSTS: dict[str, Callable[..., StepPair]] = {"timm": build_timm}


def machine(note: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg()), "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, choices=list(HOSTS))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--note", default="", help="e.g. whether other work ran on the machine")
    parser.add_argument("--out", default=None, help="default: bench/results/step_overhead_<host>.json")
    args = parser.parse_args()
    out = Path(args.out or ROOT / "bench" / "results" / f"step_overhead_{args.host}.json")
    info = machine(args.note)
    with tempfile.TemporaryDirectory() as tmp:
        pair = HOSTS[args.host](Path(tmp))
        result = time_interleaved(pair, args.repeats, args.warmup)
    info["load_average_at_end"] = list(os.getloadavg())
    rows = [f"{'host':<12}{'swap ms':>10}{'plain ms':>10}{'ratio':>8}",
            f"{args.host:<12}{result['swap_step_ms']:>10.1f}{result['plain_step_ms']:>10.1f}{result['ratio']:>8.3f}"]
    print("\n".join(rows))
    print(f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up steps each; quartiles swap "
          f"{result['swap_step_ms_quartiles']}, plain {result['plain_step_ms_quartiles']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = f"python bench/step_overhead.py {shlex.join(sys.argv[1:])}"
    out.write_text(json.dumps({"host": args.host, "command": command, "machine": info, "setup": pair.setup, **result,
                               "table": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
