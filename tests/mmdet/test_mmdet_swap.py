"""SwapHook on a tiny DINO built from mmdet's own config, trained through mmengine's Runner on CPU.

Data: real MNIST digits (pretrained classes 0, 1, 2) and Fashion-MNIST trousers and bags (learned) composited
on blank canvases as COCO files (see glyph_coco.py).
"""

from __future__ import annotations

import copy
import json
import math
import re
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.optim import OptimWrapper
from mmengine.registry import HOOKS
from mmengine.runner import Runner

from kswap import (
    ADAPTER_FILE,
    MODEL_FILE,
    CheckpointMismatchError,
    LossWeights,
    PhaseLoss,
    SwapConfig,
    SwapConfigError,
    apply_adapter,
    config_fields,
    file_sha256,
    loss_key,
    merge_and_export,
    revert_adapter,
    score_key,
    sum_task_loss,
)
from mmdet_swap import SwapCocoDataset, SwapHook, load_local_checkpoint, local_checkpoint_loader, msda
from mmdet_swap.evaluation import as_coco, coco_ap
from mmdet_swap.loop import merge_batches

from swap_testing.data import labelme_example
from swap_testing.glyph_coco import write_glyph_coco
from swap_testing.tiny_dino import DIGITS, DINO_CONFIG, LEARN, swap_cfg, tiny_dino_config

SETS = ["forget", "retain", "learn"]
MMDET_TOOLS = DINO_CONFIG.parents[2] / "tools"  # tools/train.py and tools/test.py, shipped in mmdet's wheel
# A learn set for hooks that are only constructed (the files are read once a run starts).
LEARN_SPEC = dict(classes=("bag",), train=dict(ann_file="train.json"), val=dict(ann_file="val.json"))


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


class ExportBeforeAudit(Hook):
    """Keeps what the swapped model exports as training ends, before the swap hook audits and exports it."""

    state: dict[str, torch.Tensor] = {}

    def after_train(self, runner) -> None:
        ExportBeforeAudit.state = {k: v.clone() for k, v in merge_and_export(runner.model).state_dict().items()}


# A small audit: the test checks its wiring and rows, the bench measures it at the default settings.
AUDIT = dict(relearn_shots=3, relearn_steps=8, revival_shots=2, revival_steps=4, probe_steps=50, probe_images=150)


@pytest.fixture(scope="session")
def swap_run(glyphs, pretrained_dino, tmp_path_factory):
    """The swap of the digits' DINO with the three config lines and the audit; returns the runner and its
    work_dir."""
    work = tmp_path_factory.mktemp("swap")
    runner = Runner.from_cfg(swap_cfg(glyphs, pretrained_dino, work, audit=AUDIT))
    runner.register_hook(ExportBeforeAudit())  # not in the config: the swapped config is for mmdet alone
    runner.train()
    return runner, work


def test_swap_dino_from_config(glyphs, pretrained_dino, swap_run, tmp_path):
    runner, work = swap_run
    report = json.loads((work / "swap_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    table = (work / "swap_report.md").read_text()
    assert report["metric"] == "bbox_mAP" and [p["name"] for p in report["metrics"]["phases"]] == ["0_learn",
                                                                                                    "1_forget"]
    # "before" is the pretrained model: it knows the digits and none of the new classes.
    assert before["forget"] > 30 and before["retain"] > 30 and before["learn"] == 0, table
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
    export = work / MODEL_FILE
    state = torch.load(export, weights_only=True)
    assert state["meta"]["dataset_meta"]["classes"] == DIGITS + LEARN
    assert not any("lora" in k or "base_layer" in k for k in state["state_dict"])
    assert not (work / "swapped.pth").exists()
    # the adapter alone: the LoRA weights as trained, the config, grown rows and classes to re-apply the swap
    from safetensors import safe_open

    with safe_open(work / ADAPTER_FILE, "pt") as adapter:
        lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert {k for k in adapter.keys() if "lora_" in k} == set(lora)  # noqa: SIM118 (safe_open is no dict)
        assert all(torch.equal(adapter.get_tensor(k), v) for k, v in lora.items())
        meta = adapter.metadata()
    assert SwapConfig.from_dict(json.loads(meta["swap_config"])).forget == ("0",)
    assert json.loads(meta["grown"])["bbox_head.cls_branches.0.weight"] == {"old": 3, "new": 5, "trailing": 0}
    assert json.loads(meta["classes"])["learn"] == LEARN
    code = textwrap.dedent(f"""
        import sys; sys.modules["kswap"] = None; sys.modules["mmdet_swap"] = None
        sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        import torch
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from swap_testing.tiny_dino import tiny_dino_config
        register_all_modules()
        cfg = tiny_dino_config({str(glyphs)!r}, {DIGITS + LEARN!r}, {str(tmp_path / "plain")!r})
        model = MODELS.build(cfg.model)
        model.load_state_dict(torch.load({str(export)!r}, weights_only=True)["state_dict"], strict=True)
        print("loaded", model.bbox_head.num_classes)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "loaded 5" in out.stdout, out.stderr[-2000:]


def test_apply_adapter_to_the_pretrained_detector_and_revert_it(glyphs, pretrained_dino, swap_run, tmp_path):
    """The adapter turns the plain 3-class DINO the user trained into the merged model (grown class branches and
    label embedding, merged FFNs, the BatchNorm statistics the swap updated), and reverts it exactly."""
    from mmdet.registry import MODELS

    _, work = swap_run
    model = MODELS.build(tiny_dino_config(glyphs, DIGITS, tmp_path).model)
    model.load_state_dict(load_local_checkpoint(str(pretrained_dino))["state_dict"], strict=True)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_adapter(model, work / ADAPTER_FILE)
    assert applied.adapter.round == 1 and applied.adapter.parent == file_sha256(pretrained_dino)
    merged = torch.load(work / MODEL_FILE, weights_only=True)["state_dict"]
    assert set(model.state_dict()) == set(merged)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[key], atol=1e-6, rtol=1e-5, msg=key)
    assert model.bbox_head.cls_branches[0].out_features == len(DIGITS + LEARN)
    revert_adapter(applied)
    assert set(model.state_dict()) == set(pretrained)
    assert all(torch.equal(v, pretrained[k]) for k, v in model.state_dict().items())


def test_run_patches_end_with_the_run(swap_run):
    """The checkpoint loader and the kernel routing a swap run sets up are as they were once it ended."""
    from mmengine.runner.checkpoint import CheckpointLoader

    assert CheckpointLoader._schemes[""] is not load_local_checkpoint
    assert msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda._MMCV_PYTORCH


def test_report_records_scoring_images_and_time(swap_run):
    """Each score row names the test images it read (every set: the union of the sets' test images, which the
    stock test files hold; forget_any: the forget images) and the report times scoring against the run."""
    _, work = swap_run
    report = json.loads((work / "swap_report.json").read_text())
    union = len(json.loads((work / "swapped_forget.json").read_text())["images"])
    forget_images = json.loads((work / "swapped_forget.json").read_text())["annotations"]
    assert [r["phase"] for r in report["curve"]] == ["before", "0_learn", "1_forget"]
    for row in report["curve"]:
        assert row["subsample"] is False
        assert row["images"] == {"forget": union, "retain": union, "learn": union,
                                 "forget_any": len({a["image_id"] for a in forget_images})}, row
    assert 90 < union <= 150  # the digits' and the new classes' test images together
    timing = report["timing"]
    assert 0 < timing["scoring_s"] < timing["run_s"], timing
    assert f"scoring took {timing['scoring_s']:.0f} s of the run's {timing['run_s']:.0f} s" in (
        work / "swap_report.md").read_text()


def test_before_is_the_untouched_pretrained_model(swap_run, pretrained_dino, tmp_path):
    """The report's "before" per set is what mmdet's CocoMetric gives the pretrained 3-class checkpoint."""
    _, work = swap_run
    before = json.loads((work / "swap_report.json").read_text())["metrics"]["before"]
    for name in ("forget", "retain"):
        cfg = Config.fromfile(str(work / f"swapped_test_{name}.py"))
        cfg.model.bbox_head.num_classes = len(DIGITS)
        cfg.test_dataloader.dataset.metainfo = dict(classes=tuple(DIGITS))
        cfg.load_from, cfg.work_dir = str(pretrained_dino), str(tmp_path / name)
        with local_checkpoint_loader():  # mmengine's own checkpoint under torch >= 2.6, without a SwapHook
            metrics = Runner.from_cfg(cfg).test()
        assert abs(100 * metrics["coco/bbox_mAP"] - before[name]) <= 0.1, (name, metrics, before)
    assert before["learn"] == 0  # the pretrained model knows none of the new classes


def test_stock_test_tool_scores_the_swapped_model(swap_run, tmp_path):
    """mmdet's own tools/test.py, without kswap or mmdet_swap, reproduces the report's "after" per set from the
    files the swap writes next to the merged model."""
    _, work = swap_run
    after = json.loads((work / "swap_report.json").read_text())["metrics"]["after"]
    for name in SETS:
        coco = json.loads((work / f"swapped_{name}.json").read_text())
        assert coco["categories"] == [{"id": i + 1, "name": c} for i, c in enumerate(DIGITS + LEARN)]
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["kswap"] = None; sys.modules["mmdet_swap"] = None  # the stock tools alone
        for name in {SETS!r}:
            print("SET", name, flush=True)
            sys.argv = ["test.py", f"{work}/swapped_test_{{name}}.py", "{work / MODEL_FILE}", "--work-dir",
                        f"{tmp_path}/{{name}}"]
            runpy.run_path("{MMDET_TOOLS / 'test.py'}", run_name="__main__")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    stock = {name: 100 * float(re.search(r"coco/bbox_mAP: (-?[\d.]+)", chunk).group(1))
             for name, chunk in re.findall(r"^SET (\w+)$(.*?)(?=^SET |\Z)", out.stdout, re.M | re.S)}
    assert stock.keys() == set(SETS), out.stdout[-3000:]
    for name in SETS:
        assert abs(stock[name] - after[name]) <= 0.5, (stock, after)


def test_audit_rows_for_the_pretrained_and_the_swapped_detector(swap_run):
    runner, work = swap_run
    report = json.loads((work / "swap_report.json").read_text())
    audit, before, after = report["audit"], report["metrics"]["before"], report["metrics"]["after"]
    settings = {k: v for k, v in AUDIT.items() if k != "probe_images"}
    assert audit["settings"] == {**audit["settings"], **settings} and audit["settings"]["seed"] == runner.seed
    for row in ("pretrained", "swapped"):
        assert set(audit[row]) == {"forget_score", "probe_forget_vs_retain", "probe_forget_classes",
                                   "relearn_forget_score", "revival_forget_score", "prototype_forget_score",
                                   "neighbour_mass"}, audit
        assert audit[row]["probe_forget_classes"] is None  # one forget class
        assert 0 <= audit[row]["neighbour_mass"] <= 100 * len(audit["neighbours"])
        assert 0 <= audit[row]["revival_forget_score"] <= 100 and 0 <= audit[row]["prototype_forget_score"] <= 100
    # The audit's forget score is the report's: the pretrained row is the pretrained model, the swapped row the
    # merged export.
    assert audit["pretrained"]["forget_score"] == pytest.approx(before["forget"], abs=0.05), (audit, before)
    assert audit["swapped"]["forget_score"] == pytest.approx(after["forget"], abs=0.5), (audit, after)
    # A detector trained on the digits tells its queries on 0s from those on 1s and 2s.
    assert audit["pretrained"]["probe_forget_vs_retain"] > 75, audit
    assert set(audit["neighbours"]).isdisjoint({0}) and len(audit["neighbours"]) == 3, audit
    table = (work / "swap_report.md").read_text()
    assert "## Unlearning audit" in table and "| swapped |" in table and "| pretrained |" in table, table
    assert f"Verdict: {audit['verdict']}." in table and "retain-only fine-tuning" in audit["verdict"], table


def test_audit_leaves_the_export_unchanged(swap_run):
    """model_swapped.pth is what the model exported as training ended, before the audit ran on its copies."""
    _, work = swap_run
    exported = torch.load(work / MODEL_FILE, weights_only=True)["state_dict"]
    before_audit = ExportBeforeAudit.state
    assert before_audit and exported.keys() == before_audit.keys()
    for key, value in before_audit.items():
        assert torch.equal(exported[key], value), key


def test_audit_option_checked_at_construction():
    with pytest.raises(SwapConfigError, match=r"audit has no \['relearn_shot'\]; it takes .*relearn_shots"):
        SwapHook(forget=dict(classes=("0",)), learn=LEARN_SPEC, audit=dict(relearn_shot=3))
    assert SwapHook(forget=dict(classes=("0",)), learn=LEARN_SPEC, audit=True).audit == {}
    assert SwapHook(forget=dict(classes=("0",)), learn=LEARN_SPEC).audit is None


class Relabel(torch.nn.Module):
    """A detector whose detections of class ``source`` come out as class ``target``."""

    def __init__(self, detector, source: int, target: int) -> None:
        super().__init__()
        self.detector, self.source, self.target = detector, source, target

    def val_step(self, batch):
        samples = self.detector.val_step(batch)
        for sample in samples:
            labels = sample.pred_instances.labels
            labels[labels == self.source] = self.target
        return samples


def own_images_ap(scorer, detections, name):
    """The former per-set rule: the set scored on its own images only."""
    data = scorer.coco(name)
    shown = {a["image_id"] for a in data["annotations"]}
    data["images"] = [im for im in data["images"] if im["id"] in shown]
    return coco_ap(as_coco(data), [d for d in detections if d["category_id"] - 1 in scorer.sets[name]])


def test_relabelled_forget_objects_are_exposed(glyphs, pretrained_dino, swap_run, tmp_path):
    """Forget objects relabelled as a learn class: the former per-set scores (each set on its own images) read
    forget = 0 with nothing else worse; the class-agnostic forget AP still finds every one of them."""
    from mmdet.registry import MODELS

    runner, work = swap_run
    scorer = next(h for h in runner.hooks if isinstance(h, SwapHook)).scorer
    model = MODELS.build(tiny_dino_config(glyphs, DIGITS, tmp_path).model)
    model.load_state_dict(load_local_checkpoint(str(pretrained_dino))["state_dict"])
    relabelled = Relabel(model, DIGITS.index("0"), len(DIGITS) + LEARN.index("trouser"))
    plain, gamed = scorer.detections(model), scorer.detections(relabelled)
    old = {m: {s: own_images_ap(scorer, d, s) for s in SETS} for m, d in (("plain", plain), ("gamed", gamed))}
    # Formerly: forget 0, retain the same, learn no lower (relabelled 0s that land on trousers even score).
    assert old["plain"]["forget"] > 30 and old["gamed"]["forget"] == 0, old
    assert old["gamed"]["retain"] == old["plain"]["retain"] and old["gamed"]["learn"] >= old["plain"]["learn"], old
    new = {"plain": scorer(model), "gamed": scorer(relabelled)}
    assert new["gamed"]["forget"] == 0 and new["gamed"]["forget_any"] == new["plain"]["forget_any"] > 30, new
    # The report carries it: JSON, Markdown and log.
    report = json.loads((work / "swap_report.json").read_text())
    assert "forget_any" in report["metrics"]["before"] and "forget_any" in report["metrics"]["after"]
    assert "| forget_any | lower |" in (work / "swap_report.md").read_text()


@pytest.fixture(scope="session")
def train_tool_run(glyphs, pretrained_dino, tmp_path_factory):
    """A short swap as a user runs it: mmdet's tools/train.py on a config file, every step logged, a forget
    bound below the forget loss and an LR schedule in the config. Returns the work_dir and the log text."""
    root = tmp_path_factory.mktemp("train_tool")
    cfg = swap_cfg(glyphs, pretrained_dino, root / "work")
    cfg.custom_hooks[0].update(learn_length="6steps", forget_length="6steps", forget_loss=dict(bnd=0.5))
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    # Each step's own values (time, loss), and the loss's running mean over 10 steps, as mmengine logs by default.
    cfg.log_processor = dict(by_epoch=False, window_size=1, custom_cfg=[
        dict(data_src="loss", log_name="loss_mean", method_name="mean", window_size=10)])
    # A schedule that would move the LR at every step: the swap keeps the optimizer's LR.
    cfg.param_scheduler = [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=1000)]
    cfg.dump(str(root / "swap_dino.py"))
    out = subprocess.run([sys.executable, str(MMDET_TOOLS / "train.py"), str(root / "swap_dino.py")],
                         capture_output=True, text=True, cwd=root, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (log,) = (root / "work").glob("*/*.log")
    return root / "work", log.read_text()


def iteration_lines(log: str) -> dict[int, str]:
    """The logged training iterations: iteration number -> its log line."""
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"Iter\(train\) \[\s*(\d+)/\d+\].*", log)}


def test_log_holds_only_the_current_phase_terms(train_tool_run):
    _, log = train_tool_run
    lines = iteration_lines(log)
    assert sorted(lines) == list(range(1, 13))
    for it, line in lines.items():  # 1-6: learn phase (retain, learn); 7-12: forget phase (retain, forget)
        assert f" {loss_key('retain/task')}: " in line and f" {loss_key('group_sparse')}: " in line, line
        assert (loss_key("learn/task") in line) == (it <= 6) and (loss_key("forget/task") in line) == (it > 6), line


def test_log_loss_means_cover_the_phase_alone(train_tool_run):
    """The logged running mean of the loss restarts with each phase: a forget-phase line averages forget steps."""
    _, log = train_tool_run
    lines = iteration_lines(log)
    losses = {it: float(re.search(r" loss: ([-\d.]+)", line).group(1)) for it, line in lines.items()}
    for it, line in lines.items():
        first = 1 if it <= 6 else 7
        mean = statistics.fmean(losses[i] for i in range(first, it + 1))
        assert float(re.search(r" loss_mean: ([-\d.]+)", line).group(1)) == pytest.approx(mean, abs=2e-4), line


def test_log_leaves_out_the_discarded_optimizer(train_tool_run):
    """The config's optimizer (its paramwise_cfg) is replaced by one over LoRA: none of its per-parameter lines."""
    _, log = train_tool_run
    assert "paramwise_options" not in log
    assert log.count("SwapHook: the config's optimizer is rebuilt over the LoRA parameters alone") == 1


def test_scores_logged_under_swap_keys(train_tool_run):
    """Each set's score before the swap and after each phase: in the log and in the visualizer's scalars (the
    file the training scalars go to), under ``swap/<set>`` at the step it was measured."""
    work, log = train_tool_run
    report = json.loads((work / "swap_report.json").read_text())["metrics"]
    measured = {0: report["before"], **{p["end_step"]: p["after"] for p in report["phases"]}}
    for when, scores in zip(["before", "after 0_learn", "after 1_forget"], measured.values(), strict=True):
        line = re.search(rf"SwapHook: {when} (.*)", log).group(1)
        logged = {k: float(v) for k, v in re.findall(r"(\S+): ([-\d.]+)", line)}
        assert logged == pytest.approx({score_key(k): v for k, v in scores.items()}, abs=1e-4), line
    (scalars,) = work.glob("*/vis_data/scalars.json")
    rows = [json.loads(line) for line in scalars.read_text().splitlines()]
    logged = {r["step"]: r for r in rows if score_key("forget") in r}
    assert logged.keys() == measured.keys()
    for step, scores in measured.items():
        assert logged[step] == {"step": step, **{score_key(k): v for k, v in scores.items()}}
    assert all(loss_key("retain/task") in r for r in rows if "loss" in r)


def test_log_times_steps_not_evaluations(train_tool_run):
    _, log = train_tool_run
    times = {it: float(re.search(r" time: ([\d.]+)", line).group(1)) for it, line in iteration_lines(log).items()}
    # Steps 1 and 7 come right after evaluating the three sets (about 200 images, many steps' worth of work).
    typical = statistics.median(times.values())
    assert max(times[1], times[7]) < 3 * typical, times


def test_log_names_the_checkpoint_folder_once(train_tool_run):
    _, log = train_tool_run
    assert log.count("Checkpoints will be saved to") == 1


def test_swap_keeps_the_optimizer_lr(train_tool_run):
    _, log = train_tool_run
    lrs = {float(re.search(r" lr: (\S+)", line).group(1)) for line in iteration_lines(log).values()}
    assert lrs == {2e-3}


def test_inactive_forget_bound_is_reported(train_tool_run):
    work, log = train_tool_run
    bound = json.loads((work / "swap_report.json").read_text())["forget_bounds"]["1_forget"]
    assert bound["active"] is False and bound["bnd"] == 0.5 and bound["measured_forget_loss"] > 0.5, bound
    assert "WARNING - SwapHook: phase 1_forget: the forget-set task loss at the phase start" in log


def test_relative_forget_bound_is_measured_once(glyphs, pretrained_dino, tmp_path):
    """bnd_relative: the bound is the factor times the forget loss of the phase's first step, then fixed."""
    cfg = swap_cfg(glyphs, pretrained_dino, tmp_path / "rel")
    cfg.custom_hooks[0].update(order="joint", forget_length="2steps", forget_loss=dict(bnd=3.0, bnd_relative=True))
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(by_epoch=False, window_size=1)  # each step's terms, not a running mean of loss keys
    runner = Runner.from_cfg(cfg)
    runner.train()
    bound = json.loads((tmp_path / "rel" / "swap_report.json").read_text())["forget_bounds"]["0_joint"]
    assert bound["relative"] and bound["active"], bound
    assert bound["bnd"] == pytest.approx(3 * bound["measured_forget_loss"], rel=1e-6)
    (log,) = Path(runner.log_dir).glob("*.log")
    steps = iteration_lines(log.read_text())

    def term(it: int, name: str) -> float:
        return float(re.search(rf" {loss_key(name)}: ([-\d.]+)", steps[it]).group(1))

    assert term(1, "forget/task") == pytest.approx(bound["measured_forget_loss"], abs=1e-3)
    # step 2 works against the bound measured at step 1, not against 3x its own loss
    assert term(2, "forget/bounded") == pytest.approx(0.2 * (bound["bnd"] - term(2, "forget/task")), abs=2e-3)


class StopSwap(Exception):
    """Raised by ``LoraProbe`` to end a run once it has looked."""


@HOOKS.register_module(force=True)
class LoraProbe(Hook):
    """Records, as the swap starts (after mmengine's weight init and the checkpoint load), each LoRA A's largest
    value relative to ``1/sqrt(fan_in)`` and whether every B is zero; then stops the run."""

    seen: dict[str, float] = {}
    routed = False

    def before_train(self, runner) -> None:
        LoraProbe.routed = msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda.kswap_multi_scale_deformable_attn
        state = runner.model.state_dict()
        LoraProbe.seen = {k: float(v.abs().max()) * math.sqrt(v.shape[1]) for k, v in state.items() if "lora_A" in k}
        LoraProbe.seen["B"] = max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k)
        raise StopSwap


def assert_run_patches_undone(runner: Runner) -> None:
    """A swap run's checkpoint loader and kernel routing are for that run only."""
    from mmengine.runner.checkpoint import CheckpointLoader

    assert msda.mmcv_msda.multi_scale_deformable_attn_pytorch is msda._MMCV_PYTORCH
    assert CheckpointLoader._schemes[""] is not load_local_checkpoint
    assert "load_or_resume" not in vars(runner)


@pytest.mark.parametrize("reference_init", [True, False])
def test_lora_init_follows_reference_init(glyphs, pretrained_dino, tmp_path, reference_init):
    """reference_init=True: A ~ kaiming_uniform(a=sqrt(50)), bound sqrt(6/51)/sqrt(fan_in); False: peft's
    kaiming_uniform(a=sqrt(5)), bound 1/sqrt(fan_in). B = 0 either way."""
    cfg = swap_cfg(glyphs, pretrained_dino, tmp_path / "probe", lora=dict(reference_init=reference_init))
    cfg.custom_hooks.append(dict(type="LoraProbe"))
    runner = Runner.from_cfg(cfg)
    with pytest.raises(StopSwap):
        runner.train()
    assert LoraProbe.routed  # the run's deformable attention ran on kswap's kernel
    assert_run_patches_undone(runner)  # though mmengine calls no after_run when a run raises
    seen = dict(LoraProbe.seen)
    assert seen.pop("B") == 0 and seen
    largest = max(seen.values())
    # thousands of uniform draws per matrix: the largest sits at the bound
    assert (largest <= math.sqrt(6 / 51) + 1e-6) if reference_init else (0.6 < min(seen.values()) <= largest <= 1)


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
    (dict(forget=("0",), learn=LEARN_SPEC, forget_los=dict(beta=1.0)),
     r"Unknown swap settings \['forget_los'\]; the settings are: \[.*'forget_loss'.*'restart_lr_schedule'"),
    (dict(forget=("0",), learn=LEARN_SPEC, lora=dict(rnk=4)), r"Unknown lora settings \['rnk'\]; lora has: .*'rank'"),
])
def test_hook_arguments_checked_at_construction(hook, message):
    with pytest.raises(SwapConfigError, match=message):
        SwapHook(**hook)


def test_hook_takes_every_swap_setting():
    """Every SwapConfig field goes to the detection preset under its own name; a partial mapping changes only the
    keys it names."""
    settings = dict(order="joint", learn_length="7steps", forget_length="9steps", learn_loss=dict(alpha=0.5),
                    forget_loss=dict(beta=0.5), lora=dict(rank=4), forget_retains_learned=False,
                    reset_optimizer_between_phases=True, restart_lr_schedule=True)
    assert set(settings) | set(SETS) == {f.path[0] for f in config_fields()}
    hook = SwapHook(forget=["0"], learn=LEARN_SPEC, retain=("1",), **settings)
    assert hook.config == SwapConfig.preset("detection", forget=("0",), retain=("1",), learn=("bag",), **settings)
    assert hook.config.forget_loss.beta == 0.5 and hook.config.forget_loss.bnd == 15
    assert not hook.config.forget_retains_learned and hook.config.reset_optimizer_between_phases
    assert SwapHook(forget=dict(classes=("0",)), learn=LEARN_SPEC).config.retain is None
    # The detector's loss has no distillation term: a weight for one is refused, not silently left out.
    with pytest.raises(SwapConfigError, match=r"no distillation term: set forget_loss.distill to 0"):
        SwapHook(forget=["0"], learn=LEARN_SPEC, forget_loss=dict(distill=1.0))
    with pytest.raises(SwapConfigError, match=r"no feature MMD term: set forget_loss.feature_mmd to 0"):
        SwapHook(forget=["0"], learn=LEARN_SPEC, forget_loss=dict(feature_mmd=1.0))


class OptimizerProbe(Hook):
    """Records, before each step, the optimizer and how many parameters it holds state for."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.optim.Optimizer, int]] = []

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        optimizer = runner.optim_wrapper.optimizer
        self.seen.append((optimizer, len(optimizer.state)))


class SaveProbe(Hook):
    """Records every checkpoint saved: its step, the swap position it holds and the phases it has scored."""

    def __init__(self) -> None:
        self.saved: list[tuple[int, tuple[int, int], list[str]]] = []

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        swap = checkpoint["swap"]
        self.saved.append((checkpoint["meta"]["iter"], (swap["scheduler"]["phase_index"],
                                                        swap["scheduler"]["step_in_phase"]),
                           [p["name"] for p in swap["report"]["metrics"]["phases"]]))


def test_phase_settings_are_honoured(glyphs, pretrained_dino, tmp_path):
    """forget_retains_learned=False: the forget phase retains R alone; reset_optimizer_between_phases: a fresh
    optimizer (no moments) at the forget phase start; restart_lr_schedule is reported to have no effect. The
    message hub holds each set's score and only the current phase's loss terms. The config's CheckpointHook saving
    every step: each step saved once, holding that step's position and, at a phase end, its scores."""
    cfg = swap_cfg(glyphs, pretrained_dino, tmp_path / "run", forget_retains_learned=False,
                   reset_optimizer_between_phases=True, restart_lr_schedule=True)
    cfg.custom_hooks[0].update(learn_length="2steps", forget_length="2steps")
    cfg.default_hooks.checkpoint.interval = 1
    runner = Runner.from_cfg(cfg)
    probe, saves = OptimizerProbe(), SaveProbe()
    runner.register_hook(probe)
    runner.register_hook(saves)
    runner.train()
    assert saves.saved == [(1, (0, 1), []), (2, (1, 0), ["0_learn"]), (3, (1, 1), ["0_learn"]),
                           (4, (2, 0), ["0_learn", "1_forget"])], saves.saved
    swap = next(h for h in runner.hooks if isinstance(h, SwapHook))
    assert swap.config.reset_optimizer_between_phases and not swap.config.forget_retains_learned
    retain = swap.session.loaders[1]["retain"].loader.dataset
    assert isinstance(retain, SwapCocoDataset) and retain.keep_classes == ("1", "2")
    (first, s0), (same, s1), (fresh, s2), (kept, s3) = probe.seen
    assert same is first and fresh is not first and kept is fresh
    assert (s0, s2) == (0, 0) and s1 > 0 and s3 > 0
    (log,) = Path(runner.log_dir).glob("*.log")
    assert "SwapHook: restart_lr_schedule has no effect" in log.read_text()
    hub = runner.message_hub
    after = json.loads((tmp_path / "run" / "swap_report.json").read_text())["metrics"]["after"]
    assert {k: hub.get_scalar(score_key(k)).current() for k in after} == pytest.approx(after)
    terms = {k for k in hub.log_scalars if k.startswith("train/swap/")}
    assert terms == {"train/" + loss_key(t) for t in ("retain/task", "forget/task", "forget/bounded", "group_sparse")}


@pytest.mark.parametrize("change, message", [
    (lambda cfg: cfg.custom_hooks[0].update(forget=dict(classes=("7",))), r"forget set names \['7'\]"),
    (lambda cfg: cfg.custom_hooks[0].update(retain=dict(classes=("0", "1"))), "both the forget and the retain"),
    (lambda cfg: cfg.model.bbox_head.update(num_classes=4), "bbox_head has 4 outputs, but 3 pretrained classes"),
    (lambda cfg: cfg.custom_hooks[0]["learn"]["train"].update(ann_file="missing.json"),
     r"the learn set's train annotation file '.*/missing.json' does not exist: set SwapHook's "
     r"learn=dict\(train=dict\(ann_file=...\)\) \(relative to data_root .*\) to its COCO file"),
    (lambda cfg: cfg.custom_hooks[0].update(forget=dict(classes=("0",), val=dict(ann_file="gone.json"))),
     r"the forget set's val annotation file '.*/gone.json' does not exist: set SwapHook's forget=dict\(val="),
])
def test_bad_input_fails_before_training(glyphs, pretrained_dino, tmp_path, change, message):
    cfg = swap_cfg(glyphs, pretrained_dino, tmp_path / "bad")
    change(cfg)
    runner = Runner.from_cfg(copy.deepcopy(cfg))
    with pytest.raises(SwapConfigError, match=message):
        runner.train()
    assert not list((tmp_path / "bad").glob("*.pth"))


def test_checkpoint_with_wrong_head_is_refused(glyphs, pretrained_dino, tmp_path):
    state = load_local_checkpoint(str(pretrained_dino))
    for key in [k for k in state["state_dict"] if k.startswith("bbox_head.cls_branches")]:
        state["state_dict"][key] = state["state_dict"][key][:2]
    bad = tmp_path / "two_classes.pth"
    torch.save(state, bad)
    runner = Runner.from_cfg(swap_cfg(glyphs, bad, tmp_path / "bad"))
    # Named by the pretrained size, not by the grown head's (which means nothing to the user).
    with pytest.raises(CheckpointMismatchError, match=r"The checkpoint's bbox_head.cls_branches.0.weight has 2 rows, "
                                                      r"but the pretrained label space has 3 classes \(3 rows\)\. "
                                                      "Set load_from"):
        runner.train()
    assert_run_patches_undone(runner)  # mmengine's load_or_resume raised, after before_run installed them


def test_swapped_model_is_not_swapped_again(glyphs, swap_run, tmp_path):
    """model_swapped.pth (3 + 2 class rows, as many as the grown head) in the 3-class config: refused before
    training, naming the problem and both fixes."""
    _, work = swap_run
    runner = Runner.from_cfg(swap_cfg(glyphs, work / MODEL_FILE, tmp_path / "again"))
    with pytest.raises(CheckpointMismatchError, match=r"cls_branches.0.weight has 5 rows, but the pretrained label "
                                                      r"space has 3 classes \(3 rows\) \(more rows than the "
                                                      r"pretrained classes: a swapped model\?\)\. Set load_from to "
                                                      r"the pretrained detector .*swapped_config.py"):
        runner.train()
    assert not list((tmp_path / "again").glob("*.pth"))


def swap_step_inputs(tmp_path: Path) -> tuple[torch.nn.Module, dict[str, dict]]:
    """The tiny DINO (random weights) made a swap detector as ``SwapHook.before_run`` does, and per role a
    collated batch of 2 real glyph images, each role's largest object count 2 (the same denoising layout)."""
    from mmdet.registry import DATASETS, MODELS
    from mmdet.utils import register_all_modules
    from mmengine.dataset import pseudo_collate

    from kswap import freeze_all_but_lora_, group_sparse_loss, inject_lora, lora_groups
    from mmdet_swap.detector import extend_dino_classes, make_swap_detector

    register_all_modules()
    torch.manual_seed(0)
    write_glyph_coco(tmp_path, "mnist", DIGITS, 12, "train", 0)
    cfg = swap_cfg(tmp_path, tmp_path / "unused.pth", tmp_path / "work")
    hook = SwapHook(**{k: v for k, v in cfg.custom_hooks[0].items() if k != "type"})
    model = MODELS.build(cfg.model)
    model.init_weights()
    extend_dino_classes(model, len(LEARN))
    inject_lora(model, hook.config.lora)
    freeze_all_but_lora_(model)
    groups = lora_groups(model, hook.config.lora.group_by)
    make_swap_detector(model, lambda task: PhaseLoss(LossWeights())(task, gs=group_sparse_loss(groups)))
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    samples = [dataset[i] for i in range(len(dataset))]
    two = [s for s in samples if len(s["data_samples"].gt_instances) == 2]
    one = [s for s in samples if len(s["data_samples"].gt_instances) == 1]
    batches = {"retain": pseudo_collate([two[0], one[0]]), "forget": pseudo_collate([one[1], two[1]])}
    return model, batches


def test_swap_step_runs_the_backbone_and_transformer_once(tmp_path):
    """A swap step costs one detector pass over the merged batch, not one per role."""
    model, batches = swap_step_inputs(tmp_path)
    calls = {"backbone": 0, "encoder": 0, "decoder": 0}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    model.train()
    outputs = model.train_step(merge_batches(batches), optim_wrapper=OptimWrapper(torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3)))
    assert calls == {"backbone": 1, "encoder": 1, "decoder": 1}
    assert {"retain/task", "forget/task", "forget/bounded", "group_sparse"} <= set(outputs)


def test_role_task_losses_equal_each_role_alone(tmp_path):
    """The head's loss on a role's rows of the merged pass is that role's loss run alone, given the same
    denoising layout (equal largest object count, no denoising noise) and BatchNorm on running statistics: the
    only things the merged batch shares across rows (see mmdet_swap.detector)."""
    model, batches = swap_step_inputs(tmp_path)
    # Denoising noise far below float resolution (mmdet asserts it is > 0): the same dn queries either way.
    model.dn_query_generator.label_noise_scale = model.dn_query_generator.box_noise_scale = 1e-9
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    alone = {}
    for role, batch in batches.items():
        # untagged: the detector's own loss
        losses = model(**model.data_preprocessor(copy.deepcopy(batch), True), mode="loss")
        alone[role] = sum_task_loss(losses)  # as mmengine's parse_losses sums it
    merged = model(**model.data_preprocessor(merge_batches(batches), True), mode="loss")
    for role, expected in alone.items():
        torch.testing.assert_close(merged[f"{role}/task"], expected.detach(), rtol=1e-4, atol=1e-5)
    assert (alone["retain"] - alone["forget"]).abs() > 0.05  # the roles' rows differ: a mix-up would show


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
    stop = HOOKS.register_module(name="StopAtForTest", force=True, module=type("StopAtForTest", (StopAt, Hook), {}))
    work = tmp_path / "run"
    cfg = swap_cfg(glyphs, pretrained_dino, work, checkpoint_interval=10)
    cfg.randomness = dict(seed=0)
    cfg.custom_hooks[0].update(learn_length="20steps", forget_length="20steps")
    cfg.custom_hooks.append(dict(type=stop.__name__, at=35))
    # The stock DINO pipeline's RandomFlip draws from NumPy's global RNG, which the checkpoint restores too.
    flip = next(t for t in Config.fromfile(str(DINO_CONFIG)).train_pipeline if t["type"] == "RandomFlip")
    cfg.train_dataloader.dataset.pipeline.insert(2, flip)
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
    (log,) = Path(runner.log_dir).glob("*.log")
    # Nothing about message hub keys the swap dropped (mmengine's warning on the resumed dataset metainfo remains).
    warnings = [line for line in log.read_text().splitlines() if " - WARNING - " in line and "message_hub" in line]
    assert not warnings, warnings
    # same data order, flips and denoising noise: the resumed run ends where the uninterrupted one does
    ours, theirs = runner.model.state_dict(), full.model.state_dict()
    for key in [k for k in theirs if "lora_" in k]:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)
    report = json.loads((work / "swap_report.json").read_text())
    assert report["metrics"]["before"] == first_before  # not re-measured: the run continued
    assert [p["name"] for p in report["metrics"]["phases"]] == ["0_learn", "1_forget"]
    assert [p["end_step"] for p in report["metrics"]["phases"]] == [20, 40]
    # the resumed run adds its own time to the interrupted one's (up to its last checkpoint)
    saved_timing = saved["swap"]["report"]["timing"]
    assert 0 < saved_timing["scoring_s"] < report["timing"]["scoring_s"] < report["timing"]["run_s"]
    assert saved_timing["run_s"] < report["timing"]["run_s"]


# README's command for two CPU processes (the config file and the tools folder aside).
GLOO_TRAIN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mmdet_swap.gloo_launch"]
GLOO_OPTIONS = ["--launcher", "pytorch", "--cfg-options", "model_wrapper_cfg.type=MMDistributedDataParallel",
                "model_wrapper_cfg.device_ids=None"]


@pytest.mark.ddp
def test_ddp_two_cpu_processes_with_encoder_checkpointing(glyphs, pretrained_dino, tmp_path):
    """mmdet's tools/train.py in 2 CPU processes (torchrun on a free port, gloo) with the encoder layer
    checkpointed (num_cp): the hook re-wraps the LoRA model in DDP (no device_ids, static_graph) and the run
    completes with LoRA trained."""
    import os

    work = tmp_path / "ddp"
    cfg = swap_cfg(glyphs, pretrained_dino, work)
    cfg.custom_hooks[0].update(learn_length="10steps", forget_length="10steps")
    cfg.model.encoder.num_cp = 1
    cfg.dump(str(tmp_path / "swap_dino.py"))
    out = subprocess.run([sys.executable, *GLOO_TRAIN, str(MMDET_TOOLS / "train.py"), str(tmp_path / "swap_dino.py"),
                          *GLOO_OPTIONS], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-4000:]
    report = json.loads((work / "swap_report.json").read_text())
    assert [p["end_step"] for p in report["metrics"]["phases"]] == [10, 20]
    state = load_local_checkpoint(str(work / "iter_20.pth"))
    assert not any(k.startswith("module.") for k in state["state_dict"])
    lora_b = [v for k, v in state["state_dict"].items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA trained through DDP
    assert any(k.startswith("encoder.layers.0.") for k in state["state_dict"] if "lora_B" in k)  # checkpointed


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
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == joint  # the joint list, id = label + 1
    assert coco.getCatIds(catNms=["person"]) == [joint.index("person") + 1] and len(coco.getAnnIds()) == 6
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {joint.index("person") + 1}
    assert {im["file_name"] for im in coco.dataset["images"]} <= {im["file_name"] for im in raw["images"]}
