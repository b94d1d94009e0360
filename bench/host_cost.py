"""CPU cost of stock host configs: one training step and one image's inference, with LoRA as during a swap.

What a user on CPU needs to size a swap: the swap's step runs one batch per loss role (two per step in the learn
and forget phases), and scoring runs inference over every image of the three test sets at each scoring point.

* ``dino``: mmdet's own ``dino-4scale_r50_8xb2-12e_coco.py`` (80 classes), LoRA on its FFNs (``mmdet_dino``).
* ``mask2former``: the public Mask2Former repository's own
  ``configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml`` (150 classes) built by its own code from
  a checkout given by ``--mask2former PATH`` (it is not an installable package; kswap's deformable-attention
  fallback stands in for its CUDA op), LoRA on its FFNs (``mask2former``).

Everything but LoRA is frozen, as during a swap; weights are random (nothing is downloaded) and the images are
random tensors of the stated size (DINO: two random boxes each; Mask2Former: three random classes with blocky
masks), so these are timings only. Medians of ``--repeats`` after two warm-ups. The results of each model go under
its name in ``--out``, next to those of models not run this time.

Usage: ``python bench/host_cost.py [--models dino mask2former] [--mask2former PATH] [--sizes 320 512]
[--batch 2] [--note "..."] [--out bench/results/host_cost.json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DINO_CONFIG = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0]) / ".mim" / "configs" / "dino" / \
    "dino-4scale_r50_8xb2-12e_coco.py"
M2F_CONFIG = Path("configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
TITLES = {"dino": "stock DINO-4scale R50 (mmdet config)",
          "mask2former": f"Mask2Former R50 (the repository's {M2F_CONFIG.name}, semantic ADE20K)"}


Step = Callable[[], None]


def build_dino() -> torch.nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    from kswap import LoraSettings, freeze_all_but_lora_, inject_lora

    register_all_modules()
    cfg = Config.fromfile(str(DINO_CONFIG))
    cfg.model.backbone.init_cfg = None  # no torchvision download
    model = MODELS.build(cfg.model)
    inject_lora(model, LoraSettings(targets="mmdet_dino"))
    freeze_all_but_lora_(model)
    return model


def dino_batch(size: int, n: int) -> tuple[torch.Tensor, list]:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(size)
    samples = []
    for _ in range(n):
        meta = dict(img_shape=(size, size), pad_shape=(size, size), batch_input_shape=(size, size),
                    ori_shape=(size, size), scale_factor=(1.0, 1.0))
        sample = DetDataSample(metainfo=meta)
        corners = torch.rand(2, 2, generator=g) * size * 0.5
        gt = InstanceData()
        gt.bboxes = torch.cat([corners, corners + size * 0.4], dim=1)
        gt.labels = torch.randint(0, 80, (2,), generator=g)
        sample.gt_instances = gt
        samples.append(sample)
    return torch.randn(n, 3, size, size, generator=g), samples


def dino_steps(model: torch.nn.Module, size: int, n: int) -> tuple[Step, Step]:
    """A training step and one image's inference, with mmcv's CPU deformable attention on kswap's kernel as during
    a ``SwapHook`` run."""
    from mmdet_swap import msda_routed_to_kswap

    inputs, samples = dino_batch(size, n)

    def train_step() -> None:
        model.train()
        with msda_routed_to_kswap():
            losses = model.loss(inputs, samples)
            sum(v.mean() if torch.is_tensor(v) else sum(x.mean() for x in v)
                for k, v in losses.items() if "loss" in k).backward()

    def infer() -> None:
        model.eval()
        with torch.no_grad(), msda_routed_to_kswap():
            model.predict(inputs[:1], samples[:1])

    return train_step, infer


def build_mask2former(checkout: Path) -> torch.nn.Module:
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.projects.deeplab import add_deeplab_config

    from detectron2_swap import enable_msda_fallback
    from kswap import LoraSettings, freeze_all_but_lora_, inject_lora

    config = checkout / M2F_CONFIG
    if not config.is_file():
        raise SystemExit(f"--mask2former {checkout}: no {M2F_CONFIG} there; give the root of a Mask2Former checkout.")
    enable_msda_fallback()  # before Mask2Former's import, which needs MultiScaleDeformableAttention
    sys.path.insert(0, str(checkout))
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(str(config))
    cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""  # random init: no download
    model = build_model(cfg)
    inject_lora(model, LoraSettings(targets="mask2former"))
    freeze_all_but_lora_(model)
    return model


def mask2former_steps(model: torch.nn.Module, size: int, n: int) -> tuple[Step, Step]:
    from detectron2.structures import Instances

    g = torch.Generator().manual_seed(size)
    samples = []
    for _ in range(n):
        blocks = torch.randint(0, 3, (1, 1, size // 32, size // 32), generator=g).float()
        labels = torch.nn.functional.interpolate(blocks, size=(size, size), mode="nearest")[0, 0].long()
        instances = Instances((size, size))
        instances.gt_classes = torch.randperm(model.sem_seg_head.num_classes, generator=g)[:3]
        instances.gt_masks = torch.stack([labels == k for k in range(3)])
        samples.append({"image": torch.rand(3, size, size, generator=g) * 255, "instances": instances,
                        "height": size, "width": size})

    def train_step() -> None:
        model.train()
        sum(model(samples).values()).backward()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(samples[:1])

    return train_step, infer


def timed(fn: Step, repeats: int) -> float:
    """The median of ``repeats`` calls after two warm-ups (TorchScript, which Mask2Former's matcher uses, optimises
    a scripted function at its second call)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_model(name: str, model: torch.nn.Module, steps: Callable[[torch.nn.Module, int, int], tuple[Step, Step]],
               args: argparse.Namespace) -> dict:
    """Per size, the median training step (batch ``args.batch``) and inference per image, with a printed table."""
    rows = []
    for size in args.sizes:
        train_step, infer = steps(model, size, args.batch)
        rows.append({"size": size, "batch": args.batch, "train_step_s": timed(train_step, args.repeats),
                     "inference_per_image_s": timed(infer, args.repeats)})
    lines = [f"{TITLES[name]}, LoRA on FFNs, CPU threads {torch.get_num_threads()}",
             f"{'image':>7}{'train step (batch ' + str(args.batch) + ')':>26}{'inference / image':>20}"]
    for r in rows:
        lines.append(f"{r['size']:>5}px{r['train_step_s']:>25.2f}s{r['inference_per_image_s']:>19.2f}s")
    print("\n".join(lines))
    # The checkout is the user's own folder: the recorded command names it generically.
    argv = ["<Mask2Former checkout>" if a == str(args.mask2former) else a for a in sys.argv[1:]]
    return {"command": " ".join(["python bench/host_cost.py", *argv]), "note": args.note, "rows": rows,
            "table": lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(TITLES), default=None,
                        help="default: dino, and mask2former when --mask2former is given")
    parser.add_argument("--mask2former", type=Path, default=None, help="root of a Mask2Former checkout")
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--note", default="", help="how the machine was, e.g. shared with other jobs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "host_cost.json"))
    args = parser.parse_args()
    models = args.models or ["dino"] + (["mask2former"] if args.mask2former else [])
    if "mask2former" in models and args.mask2former is None:
        parser.error("--models mask2former needs --mask2former PATH (a checkout of the Mask2Former repository)")
    builders = {"dino": (build_dino, dino_steps),
                "mask2former": (lambda: build_mask2former(args.mask2former), mask2former_steps)}
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in models:
        build, steps = builders[name]
        results[name] = time_model(name, build(), steps, args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
