"""CPU cost of the stock DINO-4scale R50 config (mmdet's own file): one training step and one image's inference.

What a user on CPU needs to size a swap: the swap's step runs one batch per loss role (two per step in the learn
and forget phases), and scoring runs inference over every image of the three test sets at each scoring point.
The model is the stock config with LoRA on its FFNs and everything else frozen, as during a swap (80 classes,
random init: no weights are downloaded); the images are random tensors of the stated size with two random boxes
each, so these are timings only. Medians of ``--repeats`` after one warm-up.

Usage: ``python bench/host_cost.py [--sizes 320 512] [--batch 2] [--out bench/results/host_cost.json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DINO_CONFIG = Path(importlib.util.find_spec("mmdet").submodule_search_locations[0]) / ".mim" / "configs" / "dino" / \
    "dino-4scale_r50_8xb2-12e_coco.py"


def build_dino() -> torch.nn.Module:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import mmdet_swap  # noqa: F401  (routes mmcv's CPU deformable attention to kswap's kernel, as custom_imports does)
    from kswap import LoraSettings, freeze_all_but_lora_, inject_lora

    register_all_modules()
    cfg = Config.fromfile(str(DINO_CONFIG))
    cfg.model.backbone.init_cfg = None  # no torchvision download
    model = MODELS.build(cfg.model)
    inject_lora(model, LoraSettings(targets="mmdet_dino"))
    freeze_all_but_lora_(model)
    return model


def batch(model: torch.nn.Module, size: int, n: int) -> tuple[torch.Tensor, list]:
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


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[320, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "host_cost.json"))
    args = parser.parse_args()
    model = build_dino()
    rows = []
    for size in args.sizes:
        inputs, samples = batch(model, size, args.batch)

        def train_step(inputs=inputs, samples=samples) -> None:
            model.train()
            losses = model.loss(inputs, samples)
            sum(v.mean() if torch.is_tensor(v) else sum(x.mean() for x in v)
                for k, v in losses.items() if "loss" in k).backward()

        def infer(inputs=inputs, samples=samples) -> None:
            model.eval()
            with torch.no_grad():
                model.predict(inputs[:1], samples[:1])

        rows.append({"size": size, "batch": args.batch, "train_step_s": timed(train_step, args.repeats),
                     "inference_per_image_s": timed(infer, args.repeats)})
    lines = [f"stock DINO-4scale R50 (mmdet config), LoRA on FFNs, CPU threads {torch.get_num_threads()}",
             f"{'image':>7}{'train step (batch ' + str(args.batch) + ')':>26}{'inference / image':>20}"]
    for r in rows:
        lines.append(f"{r['size']:>5}px{r['train_step_s']:>25.2f}s{r['inference_per_image_s']:>19.2f}s")
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/host_cost.py", *sys.argv[1:]])
    Path(args.out).write_text(json.dumps({"command": command, "rows": rows, "table": lines}, indent=2))


if __name__ == "__main__":
    main()
