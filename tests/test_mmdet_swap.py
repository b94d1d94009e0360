"""SwapHook on a tiny DINO built from mmdet's own config, trained through mmengine's Runner on CPU.

Data: real MNIST digits (pretrained classes 0, 1, 2) and Fashion-MNIST trousers and bags (learned) composited
on blank canvases as COCO files (see glyph_coco.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from glyph_coco import write_glyph_coco
from mmengine.runner import Runner
from tiny_dino import tiny_dino_config

from kswap import SwapConfigError
from mmdet_swap import SwapCocoDataset, SwapHook, load_local_checkpoint

from conftest import labelme_example

DIGITS = ["0", "1", "2"]
LEARN = ["trouser", "bag"]


@pytest.fixture(scope="session")
def glyphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs")
    write_glyph_coco(root, "mnist", DIGITS, 600, "train", 0)
    write_glyph_coco(root, "mnist", DIGITS, 90, "val", 1)
    write_glyph_coco(root, "fashion", LEARN, 400, "train", 2)
    write_glyph_coco(root, "fashion", LEARN, 60, "val", 3)
    return root


@pytest.fixture(scope="session")
def pretrained_dino(glyphs, tmp_path_factory):
    """The tiny DINO trained on the digits with mmdet's own loop (no kswap involved)."""
    from mmdet.utils import register_all_modules

    register_all_modules()
    work = tmp_path_factory.mktemp("dino_pretrain")
    runner = Runner.from_cfg(tiny_dino_config(glyphs, DIGITS, work, max_iters=400))
    runner.train()
    return work / "iter_400.pth"


def swap_cfg(glyphs, checkpoint, work_dir, **hook):
    """The user's config plus only the three swap lines."""
    cfg = tiny_dino_config(glyphs, DIGITS, work_dir)
    cfg.custom_imports = dict(imports=["mmdet_swap"], allow_failed_imports=False)
    learn = dict(classes=tuple(LEARN),
                 train=dict(ann_file="fashion_train.json", data_prefix=dict(img="fashion_train/")),
                 val=dict(ann_file="fashion_val.json", data_prefix=dict(img="fashion_val/")))
    cfg.custom_hooks = [dict(type="SwapHook", forget=dict(classes=("0",)), learn=learn, learn_length="80steps",
                             forget_length="80steps", **hook)]
    cfg.load_from = str(checkpoint)
    # A short swap needs a larger step than the reference's 1e-4 over 20 epochs.
    cfg.optim_wrapper.optimizer.lr = 2e-3
    cfg.optim_wrapper.clip_grad = dict(max_norm=1.0, norm_type=2)
    return cfg


def test_swap_dino_from_config(glyphs, pretrained_dino, tmp_path):
    runner = Runner.from_cfg(swap_cfg(glyphs, pretrained_dino, tmp_path / "swap"))
    runner.train()
    report = json.loads((tmp_path / "swap" / "swap_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = (tmp_path / "swap" / "swap_report.md").read_text()
    assert report["metric"] == "bbox_mAP" and [p["name"] for p in report["metrics"]["phases"]] == ["0_learn",
                                                                                                    "1_forget"]
    # The new rows are random (frozen, as the reference), so "before" already finds some glyph boxes.
    assert before["forget"] > 30 and before["retain"] > 30, table
    assert after["learn"] > before["learn"] + 5, table
    assert after["forget"] < before["forget"] / 4, table
    assert after["retain"] > before["retain"] * 0.8, table
    # only LoRA trained: the base weights of the FFNs are the checkpoint's
    model = runner.model
    ckpt = load_local_checkpoint(str(pretrained_dino))["state_dict"]
    assert torch.equal(model.state_dict()["encoder.layers.0.ffn.layers.1.base_layer.weight"],
                       ckpt["encoder.layers.0.ffn.layers.1.weight"])
    assert torch.equal(model.bbox_head.cls_branches[0].weight[:3], ckpt["bbox_head.cls_branches.0.weight"])
    # the merged export loads into a plain 5-class DINO without kswap
    export = tmp_path / "swap" / "swapped.pth"
    state = torch.load(export, weights_only=True)
    assert state["meta"]["dataset_meta"]["classes"] == DIGITS + LEARN
    assert not any("lora" in k or "base_layer" in k for k in state["state_dict"])
    code = textwrap.dedent(f"""
        import sys; sys.modules["kswap"] = None; sys.modules["mmdet_swap"] = None
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from tiny_dino import tiny_dino_config
        register_all_modules()
        cfg = tiny_dino_config({str(glyphs)!r}, {DIGITS + LEARN!r}, {str(tmp_path / "plain")!r})
        model = MODELS.build(cfg.model)
        model.load_state_dict(torch.load({str(export)!r}, weights_only=True)["state_dict"], strict=True)
        print("loaded", model.bbox_head.num_classes)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "loaded 5" in out.stdout, out.stderr[-2000:]


def test_swap_coco_dataset_keeps_global_labels(glyphs):
    joint = DIGITS + LEARN
    learn = SwapCocoDataset(data_root=str(glyphs), ann_file="fashion_val.json", data_prefix=dict(img="fashion_val/"),
                            metainfo=dict(classes=joint), keep_classes=LEARN, test_mode=True, pipeline=[])
    def infos(dataset):
        return [dataset.get_data_info(i) for i in range(len(dataset))]

    labels = {i["bbox_label"] for d in infos(learn) for i in d["instances"]}
    assert labels == {3, 4}  # by name in the joint space, not re-indexed to 0, 1
    forget = SwapCocoDataset(data_root=str(glyphs), ann_file="mnist_val.json", data_prefix=dict(img="mnist_val/"),
                             metainfo=dict(classes=joint), keep_classes=["0"], test_mode=True, pipeline=[])
    assert {i["bbox_label"] for d in infos(forget) for i in d["instances"]} == {0}
    assert all(d["instances"] for d in infos(forget)) and 0 < len(forget) < 90


@pytest.mark.parametrize("hook, message", [
    (dict(forget=dict(classes=("0",)), learn=dict(classes=("bag",))), "learn needs train="),
    (dict(forget=dict(), learn=dict(classes=("bag",), train={}, val={})), "forget needs classes"),
])
def test_hook_arguments_checked_at_construction(hook, message):
    with pytest.raises(SwapConfigError, match=message):
        SwapHook(**hook)


@pytest.mark.parametrize("change, message", [
    (lambda cfg: cfg.custom_hooks[0].update(forget=dict(classes=("7",))), r"forget set names \['7'\]"),
    (lambda cfg: cfg.custom_hooks[0].update(retain=dict(classes=("0", "1"))), "both the forget and the retain"),
    (lambda cfg: cfg.model.bbox_head.update(num_classes=4), "bbox_head has 4 outputs but the pretrained label"),
    (lambda cfg: cfg.custom_hooks[0]["learn"]["train"].update(ann_file="missing.json"), "missing.json"),
])
def test_bad_input_fails_before_training(glyphs, pretrained_dino, tmp_path, change, message):
    cfg = swap_cfg(glyphs, pretrained_dino, tmp_path / "bad")
    change(cfg)
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    with pytest.raises((SwapConfigError, FileNotFoundError), match=message):
        runner.train()
    assert not list((tmp_path / "bad").glob("*.pth"))


def test_checkpoint_with_wrong_head_is_refused(glyphs, pretrained_dino, tmp_path):
    state = load_local_checkpoint(str(pretrained_dino))
    for key in [k for k in state["state_dict"] if k.startswith("bbox_head.cls_branches")]:
        state["state_dict"][key] = state["state_dict"][key][:2]
    bad = tmp_path / "two_classes.pth"
    torch.save(state, bad)
    runner = Runner.from_cfg(swap_cfg(glyphs, bad, tmp_path / "bad"))
    with pytest.raises(SwapConfigError, match="shape mismatch"):
        runner.train()


class StopAt:
    """Simulates a crash: raises after training step ``at``."""

    priority = "LOWEST"

    def __init__(self, at: int) -> None:
        self.at = at

    def before_run(self, runner):
        pass

    def __getattr__(self, name):  # every other hook point: nothing to do
        if name.startswith(("before_", "after_")):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter == self.at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_the_phase(glyphs, pretrained_dino, tmp_path):
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS

    stop = HOOKS.register_module(name="StopAtForTest", force=True, module=type("StopAtForTest", (StopAt, Hook), {}))
    work = tmp_path / "run"
    cfg = swap_cfg(glyphs, pretrained_dino, work, checkpoint_interval=10)
    cfg.randomness = dict(seed=0)
    cfg.custom_hooks[0].update(learn_length="20steps", forget_length="20steps")
    cfg.custom_hooks.append(dict(type=stop.__name__, at=35))
    with pytest.raises(KeyboardInterrupt):
        Runner.from_cfg(copy.deepcopy(cfg)).train()
    last = (work / "last_checkpoint").read_text().strip()
    assert last.endswith("iter_30.pth")
    saved = load_local_checkpoint(last)
    assert saved["swap"]["scheduler"]["phase_index"] == 1 and saved["swap"]["scheduler"]["step_in_phase"] == 10
    first_before = saved["swap"]["report"]["metrics"]["before"]

    cfg.custom_hooks = cfg.custom_hooks[:1]
    full_cfg = copy.deepcopy(cfg)
    full_cfg.work_dir = str(tmp_path / "full")
    full = Runner.from_cfg(full_cfg)  # the same swap, never interrupted
    full.train()
    cfg.resume, cfg.load_from = True, None
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    runner.train()
    assert runner.iter == 40
    # same data order and denoising noise: the resumed run ends where the uninterrupted one does
    ours, theirs = runner.model.state_dict(), full.model.state_dict()
    for key in [k for k in theirs if "lora_" in k]:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)
    report = json.loads((work / "swap_report.json").read_text())
    assert report["metrics"]["before"] == first_before  # not re-measured: the run continued
    assert [p["name"] for p in report["metrics"]["phases"]] == ["0_learn", "1_forget"]
    assert [p["end_step"] for p in report["metrics"]["phases"]] == [20, 40]


def test_ddp_two_processes(glyphs, pretrained_dino, tmp_path):
    """torchrun, 2 CPU processes (gloo): the hook re-wraps the LoRA model in DDP and the run completes."""
    import os

    work = tmp_path / "ddp"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544",
         str(Path(__file__).parent / "dist_swap_dino.py"), str(glyphs), str(pretrained_dino), str(work)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads((work / "swap_report.json").read_text())
    assert [p["end_step"] for p in report["metrics"]["phases"]] == [10, 20]
    state = load_local_checkpoint(str(work / "iter_20.pth"))
    assert not any(k.startswith("module.") for k in state["state_dict"])
    lora_b = [v for k, v in state["state_dict"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA trained through DDP


@pytest.fixture(scope="session")
def labelme_coco():
    """labelme's example COCO file: 3 real VOC photos with 12 instances."""
    return labelme_example("instance_segmentation/data_dataset_coco")


def test_swap_coco_dataset_on_real_photos(labelme_coco):
    raw = json.loads((labelme_coco / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    pretrained = [n for n in names.values() if n != "_background_"]
    joint = pretrained + ["zebra"]
    people = SwapCocoDataset(data_root=str(labelme_coco), ann_file="annotations.json",
                             data_prefix=dict(img=""), metainfo=dict(classes=joint), keep_classes=["person"],
                             test_mode=True, pipeline=[])
    gt = [a for a in raw["annotations"] if names[a["category_id"]] == "person"]
    infos = [people.get_data_info(i) for i in range(len(people))]
    boxes = sorted(tuple(round(v, 2) for v in inst["bbox"]) for d in infos for inst in d["instances"])
    assert len(boxes) == len(gt) == 6
    assert boxes == sorted((round(x, 2), round(y, 2), round(x + w, 2), round(y + h, 2)) for x, y, w, h in
                           (a["bbox"] for a in gt))
    assert {inst["bbox_label"] for d in infos for inst in d["instances"]} == {joint.index("person")}
    from mmdet_swap.evaluation import coco_from_dataset

    coco = coco_from_dataset(people)
    assert coco.getCatIds() == [joint.index("person")] and len(coco.getAnnIds()) == 6
