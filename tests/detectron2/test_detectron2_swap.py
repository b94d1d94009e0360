"""detectron2_swap on real detectron2 (CPU): the SWAP config, the Mask2Former preset, an end-to-end swap with the
built-in SemanticSegmentor, resume, DDP through detectron2's launch, real VOC masks, and bad input.

Data: composited real MNIST digits (pretrained classes: background, 0-3) and Fashion-MNIST trousers and bags
(learned), label PNGs from the glyph pixels (synthetic layout, real objects); labelme's real PASCAL VOC masks.
The models are small and trained here (``d2_models``): no detectron2 weights exist offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from PIL import Image

from detectron2_swap import (
    ROLE_KEY,
    SwapCheckpointer,
    SwapPlan,
    add_swap_config,
    label_table,
    per_class_iou,
    swap_config_from_cfg,
)
from kswap import (
    PRESETS,
    CheckpointMismatchError,
    PhaseLoss,
    SwapConfig,
    SwapConfigError,
    config_fields,
    group_sparse_loss,
    lora_state_dict,
)

from swap_testing.d2_models import (
    DIGITS,
    TESTS_DIR,
    glyph_cfg,
    make_trainer_classes,
    register_datasets,
    run_swap,
    swap_glyphs,
)
from swap_testing.data import labelme_example

Trainer, SwapTrainer = make_trainer_classes()


# -- config -----------------------------------------------------------------------------------------------------

def test_swap_block_defaults_are_the_segmentation_preset(tmp_path):
    cfg = get_cfg()
    add_swap_config(cfg)
    (tmp_path / "swap.yaml").write_text(textwrap.dedent("""
        SWAP:
          ENABLED: True
          ORDER: forget_then_learn
          FORGET: ["3"]
          LEARN: ["trouser"]
          LEARN_LENGTH: 40steps
          FORGET_LOSS:
            BND: 90.0
    """))
    cfg.merge_from_file(str(tmp_path / "swap.yaml"))
    config = swap_config_from_cfg(cfg)
    preset = PRESETS["segmentation"]
    assert config.order.value == "forget_then_learn" and config.forget == ("3",) and config.retain is None
    assert config.learn_length.steps == 40 and config.forget_length == preset["forget_length"]
    assert config.forget_loss.bnd == 90.0 and config.forget_loss.beta == preset["forget_loss"].beta == 0.2
    assert config.learn_loss == preset["learn_loss"] and config.learn_loss.learn_weight == 0.9
    assert config.lora == preset["lora"] and config.reset_optimizer_between_phases and config.restart_lr_schedule
    assert not get_cfg().get("SWAP"), "add_swap_config must not touch detectron2's global defaults"


def leaf_keys(node: CfgNode, prefix: str = "") -> set[str]:
    return {key for name, value in node.items()
            for key in (leaf_keys(value, f"{prefix}{name}.") if isinstance(value, CfgNode) else [prefix + name])}


def test_swap_block_is_generated_from_the_core_settings():
    cfg = get_cfg()
    add_swap_config(cfg)
    # Every SwapConfig setting under its shared name; the other keys are detectron2's.
    host = {"ENABLED", "DATASETS", "IMS_PER_BATCH", "CHAIN_FROM_ITER", "EVAL_PERIOD", "EVAL_IMAGES", "HEAD", "SOLVER",
            "AUDIT"}
    assert {k for k in leaf_keys(cfg.SWAP) if k.split(".")[0] not in host} == {f.cfg_key for f in config_fields()}
    cfg.merge_from_list(["SWAP.FORGET", ["3"], "SWAP.LEARN", ["trouser"]])
    assert swap_config_from_cfg(cfg) == SwapConfig.preset("segmentation", forget=["3"], learn=["trouser"])
    cfg.merge_from_list(["SWAP.LORA.RANK", 4, "SWAP.FORGET_LOSS.DISTILL", 0.5, "SWAP.LORA.GROUP_BY", "backbone",
                         "SWAP.RESET_OPTIMIZER_BETWEEN_PHASES", False, "SWAP.RETAIN", ["0"]])
    assert swap_config_from_cfg(cfg) == SwapConfig.preset(
        "segmentation", forget=["3"], learn=["trouser"], retain=["0"], lora=dict(rank=4, group_by="backbone"),
        forget_loss=dict(distill=0.5), reset_optimizer_between_phases=False)


@pytest.mark.parametrize("yaml, old, new", [
    ("FORGET_CLASSES: ['3']", "SWAP.FORGET_CLASSES", "SWAP.FORGET"),
    ("LEARN_ITERS: 40", "SWAP.LEARN_ITERS", "SWAP.LEARN_LENGTH"),
    ("RESET_OPTIMIZER: False", "SWAP.RESET_OPTIMIZER", "SWAP.RESET_OPTIMIZER_BETWEEN_PHASES"),
    ("LOSS:\n  FORGET:\n    BND: 90.0", "SWAP.LOSS", "SWAP.LEARN_LOSS and SWAP.FORGET_LOSS"),
])
def test_an_old_key_in_a_yaml_names_the_new_one(tmp_path, yaml, old, new):
    cfg = get_cfg()
    add_swap_config(cfg)
    (tmp_path / "old.yaml").write_text("SWAP:\n" + textwrap.indent(yaml, "  "))
    with pytest.raises(KeyError, match=f"Key {old} was renamed to {new}; please update your config. Note: .*3500steps"):
        cfg.merge_from_file(str(tmp_path / "old.yaml"))


def test_an_old_key_in_opts_names_the_new_one():
    cfg = get_cfg()
    add_swap_config(cfg)
    with pytest.raises(KeyError, match="Key SWAP.LOSS.FORGET.BND was renamed to SWAP.FORGET_LOSS.BND"):
        cfg.merge_from_list(["SWAP.LOSS.FORGET.BND", 90.0])  # a removed node's leaf, as train_net.py's opts give it
    with pytest.raises(KeyError, match="Key SWAP.LEARN_CLASSES was renamed to SWAP.LEARN"):
        cfg.clone().merge_from_list(["SWAP.LEARN_CLASSES", ["trouser"]])  # the trainer's clones keep the renames


def test_a_phase_length_in_epochs_is_refused():
    cfg = get_cfg()
    add_swap_config(cfg)
    cfg.merge_from_list(["SWAP.FORGET", ["3"], "SWAP.LEARN", ["trouser"], "SWAP.FORGET_LENGTH", "5epochs"])
    with pytest.raises(SwapConfigError, match="cfg.SWAP.FORGET_LENGTH='5epochs' is not a number of iterations: "
                                              "detectron2's data loaders are infinite.*write e.g. 3500steps"):
        swap_config_from_cfg(cfg)


# -- Mask2Former preset -----------------------------------------------------------------------------------------

def give_phase_loss(model: torch.nn.Module, cfg: CfgNode, phase: int) -> torch.nn.Module:
    """The loss of the plan's ``phase`` on a prepared model, as a ``SwapHook``'s session gives it."""
    weights = SwapPlan.from_cfg(cfg).phases[phase].loss
    model.swap_state.loss = lambda task: PhaseLoss(weights)(task, gs=group_sparse_loss(model.swap_state.groups))
    return model


def test_mask2former_preset_on_a_model_with_its_names(glyph_spec, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path), meta="MiniMask2Former"), tmp_path / "m2f.pth", learn=3, forget=3)
    plain = build_model(cfg)
    DetectionCheckpointer(plain, str(tmp_path)).save("m2f")  # the "pretrained" Mask2Former (plain detectron2)
    model = SwapTrainer.build_model(cfg)

    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    fc, linear = (1, 2), (1, 2)
    expected = {f"backbone.layers.{s}.blocks.{b}.mlp.fc{i}" for s, n in ((0, 1), (1, 2)) for b in range(n) for i in fc}
    encoder = "sem_seg_head.pixel_decoder.transformer.encoder.layers"
    expected |= {f"{encoder}.{n}.linear{i}" for n in range(2) for i in linear}
    expected |= {f"sem_seg_head.predictor.transformer_ffn_layers.{n}.linear{i}" for n in range(3) for i in (1, 2)}
    assert lora == expected  # not mask_embed, not attention, not the class head
    groups = model.swap_state.groups
    assert len(groups) == 3 + 2 + 3 and all(len(g) == 4 for g in groups.values())  # one group per block/layer
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n}

    # The class head grew before its "no object" row; everything sized by it followed.
    assert model.sem_seg_head.predictor.class_embed.out_features == 7 + 1
    head = model.sem_seg_head
    assert head.num_classes == head.predictor.num_classes == model.criterion.num_classes == 7
    assert model.criterion.empty_weight.tolist() == pytest.approx([1.0] * 7 + [0.1])

    checkpointer = SwapCheckpointer(model, grown=model.swap_state.grown)
    incompatible = checkpointer._load_model(checkpointer._load_file(str(tmp_path / "m2f.pth")))
    assert not incompatible.missing_keys and not incompatible.unexpected_keys  # LoRA keys are expected missing
    old, new = plain.sem_seg_head.predictor.class_embed, model.sem_seg_head.predictor.class_embed
    assert torch.equal(new.weight[:5], old.weight[:5]) and torch.equal(new.weight[-1], old.weight[-1])
    assert torch.equal(new.bias[-1], old.bias[-1]) and torch.equal(new.bias[5:7], torch.zeros(2))

    # One training forward over role-tagged samples gives one loss; only LoRA gets gradients.
    sample = {"image": torch.zeros(3, 64, 64), "sem_seg": torch.zeros(64, 64, dtype=torch.long), "height": 64,
              "width": 64}
    model.train()
    batch = [{**sample, ROLE_KEY: "retain"}, {**sample, ROLE_KEY: "learn"}]
    with pytest.raises(RuntimeError, match="register the SwapHook"):
        model(batch)  # the phase loss is the swap session's: a SwapHook gives it
    give_phase_loss(model, cfg, phase=0)
    losses = model(batch)
    assert set(losses) == {"loss_swap"} and torch.isfinite(losses["loss_swap"])
    losses["loss_swap"].backward()
    assert all((p.grad is not None) == (".lora_" in n) for n, p in model.named_parameters())

    trainer = run_swap(cfg)  # the whole trainer runs on it too
    assert [p["name"] for p in trainer.swap_hook.session.report.phases] == ["0_learn", "1_forget"]


# -- end to end -------------------------------------------------------------------------------------------------

def test_swap_semantic_segmentor_end_to_end(glyph_spec, d2_pretrained, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained)
    trainer = run_swap(cfg)

    report = json.loads((tmp_path / "swap_report.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    print(json.dumps(report["metrics"], indent=1))
    assert [p["name"] for p in report["metrics"]["phases"]] == ["0_learn", "1_forget"]
    assert after["learn"] > before["learn"] + 20, "the new classes were not learned"
    assert after["forget"] < before["forget"] / 3, "digit 3 was not forgotten"
    assert after["retain"] > before["retain"] - 12, "the retained classes were not kept"
    assert report["classes"] == {"forget": ["3"], "retain": ["background", "0", "1", "2"], "learn": ["trouser", "bag"]}
    assert (tmp_path / "swap_report.md").exists() and (tmp_path / "swap_report.png").exists()
    # Optimizer over LoRA only; a fresh one per phase (segmentation preset).
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in trainer.model.named_parameters() if ".lora_" in n}

    # The merged model loads into plain detectron2, in a process that never imports detectron2_swap.
    sample = DatasetCatalog.get("glyph_digits_val")[0]
    image = torch.as_tensor(np.asarray(Image.open(sample["file_name"]).convert("RGB"))[:, :, ::-1].copy())
    inputs = [{"image": image.permute(2, 0, 1).float(), "height": 64, "width": 64}]
    trainer.model.eval()
    with torch.no_grad():
        torch.save(trainer.model(inputs)[0]["sem_seg"], tmp_path / "expected.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from swap_testing import d2_models
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.modeling import build_model
        cfg = get_cfg(); d2_models.add_glyph_config(cfg); cfg.merge_from_file({str(tmp_path / 'config_swapped.yaml')!r})
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'inputs.pt')!r}))[0]["sem_seg"]
        assert "detectron2_swap" not in sys.modules and "kswap" not in sys.modules and "peft" not in sys.modules
        torch.testing.assert_close(out, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-4, rtol=1e-4)
        print("plain", out.shape[0])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plain 7" in done.stdout
    saved = torch.load(tmp_path / "model_swapped.pth", weights_only=True)
    assert saved["classes"] == DIGITS + ["trouser", "bag"]


@pytest.mark.parametrize("order, kinds", [
    ("forget_then_learn", ["forget", "learn"]),
    ("learn_forget_learn", ["learn", "forget", "learn"]),
    ("forget_learn_forget", ["forget", "learn", "forget"]),
    ("joint", ["joint"]),
])
def test_every_order_runs_its_phases(glyph_spec, d2_pretrained, tmp_path, order, kinds):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, learn=3, forget=3, ORDER=order)
    trainer = run_swap(cfg)
    session = trainer.swap_hook.session
    assert [p["kind"] for p in session.report.phases] == kinds
    assert trainer.iter == 3 * len(kinds)  # detectron2 leaves iter at max_iter after training
    # Each phase's role loaders draw from the sets the plan says: a forget phase after a learn phase retains R ∪ L.
    drawn = [{role: it.loader.sources for role, it in roles.items()} for roles in session.loaders]
    assert drawn == [dict(p.sources) for p in trainer.swap_plan.phases]
    if order == "learn_forget_learn":
        assert drawn[1]["retain"] == ("retain", "learn")


def test_chain_from_iter_restarts_the_next_phase_from_that_iteration(glyph_spec, d2_pretrained, tmp_path):
    seen = {}

    class Probe(HookBase):
        def before_step(self):
            if self.trainer.iter == 6:
                seen["start_of_forget"] = lora_state_dict(self.trainer.model)

        def after_step(self):
            if self.trainer.iter == 2:
                seen["iteration_3"] = lora_state_dict(self.trainer.model)

    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, learn=6, forget=2, CHAIN_FROM_ITER=3)
    trainer = run_swap(cfg, extra_hooks=[Probe()])
    assert trainer.iter == 8
    for key, value in seen["iteration_3"].items():
        torch.testing.assert_close(seen["start_of_forget"][key], value, rtol=0, atol=0)


def test_lazyconfig_composes_the_same_pieces(glyph_spec, d2_pretrained, tmp_path):
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate
    from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
    from detectron2.data import transforms as T
    from detectron2.engine import SimpleTrainer
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.meta_arch.semantic_seg import SemanticSegmentor, SemSegFPNHead

    from detectron2_swap import DetectionRoleLoader, SetScorer, SwapDataLoader, SwapHook, prepare_swap_model
    from kswap import ForgetLoss, LoraSettings, SwapConfig

    from swap_testing.d2_models import GlyphViT

    digits, clothes = ["glyph_digits_train"], ["glyph_clothes_train"]
    plan = L(SwapPlan.from_datasets)(
        config=L(SwapConfig.preset)(
            task="segmentation", forget=["3"], learn=["trouser", "bag"], learn_length="4steps",
            forget_length="4steps", lora=L(LoraSettings)(targets=r"backbone\.blocks\.\d+\.ffn\.linear[12]"),
            forget_loss=L(ForgetLoss)(bnd=3.0, alpha=1e-4)),
        pretrained_dataset="glyph_digits_train",
        train=dict(forget=digits, retain=digits, learn=clothes),
        test=dict(forget=["glyph_digits_val"], retain=["glyph_digits_val"], learn=["glyph_clothes_val"]))
    model = L(prepare_swap_model)(plan=plan, model=L(SemanticSegmentor)(
        backbone=L(GlyphViT)(dim=32, depth=2), pixel_mean=[128.0] * 3, pixel_std=[64.0] * 3,
        sem_seg_head=L(SemSegFPNHead)(input_shape={"p2": L(ShapeSpec)(channels=32, stride=4)}, num_classes=5,
                                      conv_dims=32, common_stride=4, norm="", ignore_value=255)))
    resize = L(T.ResizeShortestEdge)(short_edge_length=64, max_size=86)
    loader = L(SwapDataLoader)(plan=plan, build_loader=L(DetectionRoleLoader)(
        mapper=L(DatasetMapper)(is_train=True, augmentations=[resize], image_format="BGR"), total_batch_size=8))

    plan, model, loader = instantiate(plan), instantiate(model), instantiate(loader)
    SwapCheckpointer(model, grown=model.swap_state.grown).load(str(d2_pretrained))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    trainer = SimpleTrainer(model, loader, optimizer)
    test_mapper = DatasetMapper(is_train=False, augmentations=[instantiate(resize)], image_format="BGR")
    scorer = SetScorer(plan, lambda name: build_detection_test_loader(get_detection_dataset_dicts([name]),
                                                                      mapper=test_mapper))
    hook = SwapHook(plan, model, loader, out_dir=tmp_path, score=lambda subsample: scorer(model, subsample=subsample),
                    checkpointer=SwapCheckpointer(model, str(tmp_path), grown=model.swap_state.grown, trainer=trainer))
    trainer.register_hooks([hook])
    trainer.train(0, hook.session.scheduler.total_steps)
    assert [p["name"] for p in hook.session.report.phases] == ["0_learn", "1_forget"]
    assert (tmp_path / "model_swap_1_forget.pth").exists() and (tmp_path / "model_swapped.pth").exists()


# -- resume -----------------------------------------------------------------------------------------------------

class StopAt(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise KeyboardInterrupt(f"stopped at {self.iteration}")


def resumable_cfg(out: Path, weights: Path) -> CfgNode:
    cfg = swap_glyphs(glyph_cfg(str(out)), weights, learn=8, forget=8)
    cfg.SOLVER.CHECKPOINT_PERIOD = 4
    # Random flips (drawn by the data pipeline) and attention dropout (by the model): a resume restores both.
    cfg.INPUT.RANDOM_FLIP, cfg.MODEL.GLYPH.DROPOUT = "horizontal", 0.1
    return cfg


def test_resume_continues_the_phase_and_ends_as_an_uninterrupted_run(glyph_spec, d2_pretrained, tmp_path):
    uninterrupted = run_swap(resumable_cfg(tmp_path / "uninterrupted", d2_pretrained))
    out = tmp_path / "resumed"
    cfg = resumable_cfg(out, d2_pretrained)
    with pytest.raises(KeyboardInterrupt):
        run_swap(cfg, extra_hooks=[StopAt(13)])  # mid forget phase; the last checkpoint is after iteration 11
    assert (out / "last_checkpoint").read_text() == "model_0000011.pth"
    assert (out / "model_swap_0_learn.pth").exists() and not (out / "model_swapped.pth").exists()
    saved = torch.load(out / "model_0000011.pth", weights_only=True)  # our checkpoints are weights-only
    swap_state = saved["trainer"]["hooks"]["SwapHook"]
    assert swap_state["scheduler"]["phase_index"] == 1 and swap_state["scheduler"]["step_in_phase"] == 4
    assert swap_state["data"]["streams"][-1] == {"drawn": 4}  # the forget phase's forget role
    assert saved["trainer"]["_trainer"]["optimizer"]["state"]  # AdamW's moments
    run_s = swap_state["report"]["timing"]["run_s"]
    assert run_s > swap_state["report"]["timing"]["scoring_s"] > 0

    seed_all_rng(1)  # another process's seeds: what the resumed run draws comes from the checkpoint
    trainer = SwapTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 12
    session = trainer.swap_hook.session
    assert session.phase.name == "1_forget" and session.scheduler.step_in_phase == 4
    assert trainer.scheduler.last_epoch == swap_state["lr_scheduler"]["last_epoch"]  # the forget phase's schedule
    assert session.weights() == trainer.swap_plan.phases[1].loss
    for key, value in lora_state_dict(trainer.model).items():
        torch.testing.assert_close(value, saved["model"][key], rtol=0, atol=0)
    steps = []

    class Count(HookBase):
        def after_step(self):
            steps.append(self.trainer.iter)

    trainer.register_hooks([Count()])
    trainer.train()
    assert steps == list(range(12, 16))
    report = json.loads((out / "swap_report.json").read_text())
    assert [p["name"] for p in report["metrics"]["phases"]] == ["0_learn", "1_forget"]
    assert report["timing"]["run_s"] > run_s  # the resumed run adds its time to the interrupted run's
    assert (out / "model_swapped.pth").exists()
    # The same batches, optimizer moments and dropout masks: the run ends where the uninterrupted one ends.
    expected = lora_state_dict(uninterrupted.model)
    for key, value in lora_state_dict(trainer.model).items():
        torch.testing.assert_close(value, expected[key], msg=key)
    phases = uninterrupted.swap_hook.session.report.phases
    assert [p["after"] for p in report["metrics"]["phases"]] == [pytest.approx(p["after"]) for p in phases]


class SignalAt(HookBase):
    """Sends this process ``signum`` as iteration ``iteration`` starts (Ctrl-C, or a cluster's preemption)."""

    def __init__(self, iteration: int, signum: signal.Signals) -> None:
        self.iteration, self.signum = iteration, signum

    def before_step(self):
        if self.trainer.iter == self.iteration:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_phase_stops_after_the_step_with_a_checkpoint(glyph_spec, d2_pretrained, tmp_path, signum):
    def cfg(out: Path) -> CfgNode:
        return swap_glyphs(glyph_cfg(str(out)), d2_pretrained, learn=4, forget=4)

    uninterrupted = run_swap(cfg(tmp_path / "uninterrupted"))
    out = tmp_path / "stopped"

    def killed(signum, frame):  # what SIGTERM does to a process that does not handle it
        pytest.fail("the signal reached the process's own handler")

    previous = signal.signal(signal.SIGTERM, killed)
    try:
        with pytest.raises(KeyboardInterrupt, match=f"stopped by {signum.name} after iteration 5, with a checkpoint"):
            run_swap(cfg(out), extra_hooks=[SignalAt(5, signum)])
        assert signal.getsignal(signal.SIGTERM) is killed  # the process's handlers are back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (out / "last_checkpoint").read_text() == "model_0000005.pth"  # mid forget phase, no period due
    trainer = SwapTrainer(cfg(out))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 6
    trainer.train()
    expected = lora_state_dict(uninterrupted.model)
    for key, value in lora_state_dict(trainer.model).items():
        torch.testing.assert_close(value, expected[key], msg=key)


# -- DDP --------------------------------------------------------------------------------------------------------

@pytest.mark.ddp
def test_ddp_two_gloo_processes_through_detectron2_launch(glyph_spec, d2_pretrained, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from detectron2.engine import launch
        from swap_testing import d2_models
        args = ({str(glyph_spec)!r}, {str(d2_pretrained)!r}, {str(tmp_path)!r})
        launch(d2_models.ddp_main, 2, dist_url="auto", args=args)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["ddp"] for r in ranks)
    assert any(v.abs().sum() > 0 for k, v in ranks[0]["lora"].items() if "lora_B" in k), "LoRA did not train"
    for key, value in ranks[0]["lora"].items():  # gradients were averaged: both ranks hold the same weights
        torch.testing.assert_close(ranks[1]["lora"][key], value)
    report = json.loads((tmp_path / "swap_report.json").read_text())  # written once, by rank 0
    assert [p["name"] for p in report["metrics"]["phases"]] == ["0_learn", "1_forget"]
    assert [(r["step"], r["subsample"]) for r in report["curve"]] == [
        (0, False), (4, True), (6, False), (8, True), (12, False)]


# -- real VOC masks ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def labelme_voc(tmp_path_factory) -> str:
    """labelme's 3 real PASCAL VOC photos with their semantic masks, registered with VOC's 21 class names.

    VOC masks are palette PNGs; detectron2's mappers read labels as grayscale, so they are saved as such first
    (the class ids unchanged), as a detectron2 user prepares VOC.
    """
    root = labelme_example("semantic_segmentation/data_dataset_voc")
    labels = tmp_path_factory.mktemp("voc_labels")
    classes = (root / "class_names.txt").read_text().split("\n")[:21]
    records = []
    for i, jpg in enumerate(sorted((root / "JPEGImages").glob("*.jpg"))):
        width, height = Image.open(jpg).size
        ids = np.asarray(Image.open(root / "SegmentationClass" / f"{jpg.stem}.png"))
        Image.fromarray(ids.astype(np.uint8), mode="L").save(labels / f"{jpg.stem}.png")
        records.append({"file_name": str(jpg), "sem_seg_file_name": str(labels / f"{jpg.stem}.png"),
                        "height": height, "width": width, "image_id": i})
    register_datasets({"labelme_voc": {"records": records, "stuff_classes": classes}})
    return "labelme_voc"


def test_real_voc_masks_map_by_class_name(glyph_spec, labelme_voc, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth")
    cfg.SWAP.LEARN = ["person", "bus"]
    cfg.SWAP.DATASETS.LEARN = cfg.SWAP.DATASETS.LEARN_TEST = (labelme_voc,)
    plan = SwapPlan.from_cfg(cfg)
    person, bus = plan.space.id_of("person"), plan.space.id_of("bus")
    assert (person, bus) == (5, 6)  # after the 5 pretrained classes, in the order given: no offsets
    ignore = plan.space.num_classes
    voc = MetadataCatalog.get(labelme_voc).stuff_classes
    table = plan.label_table(labelme_voc, ["learn"], ignore)
    for record in DatasetCatalog.get(labelme_voc):
        raw = np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
        mapped = table[raw]
        for name, joint in (("person", person), ("bus", bus)):
            assert (mapped == joint).sum() == (raw == voc.index(name)).sum()
        assert set(np.unique(mapped)) <= {person, bus, ignore}
    assert sum((table[np.asarray(Image.open(r["sem_seg_file_name"]))] == person).sum()
               for r in DatasetCatalog.get(labelme_voc)) > 10_000
    # The VOC background is a retained class here: a learn image's background pixels still teach it.
    train = plan.label_table(labelme_voc, plan.target_sets(("learn",)), ignore)
    assert train[voc.index("_background_")] == ignore  # "_background_" is not the digits' "background"
    confusion = np.zeros((ignore + 1, ignore + 1), np.int64)
    confusion[person, person], confusion[bus, person], confusion[ignore, person] = 30, 10, 5
    assert per_class_iou(confusion, plan.space.names) == {"mIoU": 75.0, "IoU-person": 75.0}


def test_swap_learns_a_class_from_real_voc_photos(glyph_spec, d2_pretrained, labelme_voc, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, learn=60, forget=4)
    cfg.SWAP.LEARN = ["person"]
    cfg.SWAP.DATASETS.LEARN = cfg.SWAP.DATASETS.LEARN_TEST = (labelme_voc,)
    cfg.SWAP.IMS_PER_BATCH = 2
    trainer = run_swap(cfg)
    report = trainer.swap_hook.session.report
    before, after_learn = report.before, report.phases[0]["after"]
    assert after_learn["learn"] > before["learn"] + 10


# -- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(DATASETS__LEARN=("nope_train",)), "'nope_train' (the learn train set) is not registered"),
    (dict(RETAIN=["2", "3"]), "in both the forget and the retain set"),
    (dict(FORGET=["7"]), "The forget set names ['7']"),
    (dict(LEARN=["trouser", "sandal"]), "The learn classes ['sandal'] are in none of the learn datasets"),
    (dict(FORGET=[]), "cfg.SWAP.FORGET is empty"),
    (dict(LEARN_LENGTH="0steps"), "cfg.SWAP.LEARN_LENGTH='0steps' is not a number of iterations"),
    (dict(DATASETS__LEARN_TEST=()), "set cfg.SWAP.DATASETS.LEARN_TEST"),
    (dict(LORA__TARGETS=r"backbone\.nothing"), "matches no linear layer"),
    (dict(ORDER="learn_only"), "Unknown order 'learn_only'"),
    (dict(EVAL_IMAGES=0), "cfg.SWAP.EVAL_IMAGES (the images of a set a periodic score reads) must be >= 1, got 0"),
])
def test_bad_config_fails_before_training(glyph_spec, d2_pretrained, tmp_path, change, message):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, **change)
    with pytest.raises(SwapConfigError) as err:
        SwapTrainer(cfg)
    assert message in str(err.value)
    assert not list(tmp_path.glob("*.pth"))


def test_disabled_swap_is_the_users_trainer_and_a_missing_swap_node_is_named(glyph_spec, tmp_path):
    cfg = glyph_cfg(str(tmp_path))
    cfg.SOLVER.MAX_ITER = 2
    trainer = SwapTrainer(cfg)  # SWAP.ENABLED is False by default
    assert not any(".lora_" in n for n, _ in trainer.model.named_parameters())
    assert type(trainer.checkpointer) is DetectionCheckpointer and trainer.max_iter == 2
    cfg = get_cfg()
    with pytest.raises(SwapConfigError, match="call detectron2_swap.add_swap_config"):
        SwapTrainer(cfg)


def test_a_batch_without_target_pixels_is_named(glyph_spec, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth")
    model = give_phase_loss(SwapTrainer.build_model(cfg), cfg, phase=1)
    sample = {"image": torch.zeros(3, 64, 64), "height": 64, "width": 64, ROLE_KEY: "forget",
              "sem_seg": torch.full((64, 64), 255, dtype=torch.long)}  # every pixel ignored
    with pytest.raises(FloatingPointError, match=r"The \['forget'\] task loss of this batch is not finite"):
        model([sample])


@pytest.mark.parametrize("key, message", [
    ("FORGET_LOSS__DISTILL", "no distillation term: set forget_loss.distill"),
    ("FORGET_LOSS__FEATURE_MMD", "no feature MMD term: set forget_loss.feature_mmd")])
def test_timm_only_terms_are_refused_before_a_model_is_built(glyph_spec, tmp_path, key, message):
    # The model's loss has no such term: a weight for one is refused, not silently left out.
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth", **{key: 0.5})
    with pytest.raises(SwapConfigError, match=message):
        SwapTrainer(cfg)


@pytest.mark.parametrize("meta, num_classes, rows", [("SemanticSegmentor", 6, "6 outputs, but 5 pretrained classes "
                                                       "need 5 outputs"),
                                                      ("MiniMask2Former", 7, "8 outputs, but 5 pretrained classes "
                                                       "need 6 outputs (5 classes + 1 trailing)")])
def test_wrong_head_size_names_the_config_key_and_its_value(glyph_spec, tmp_path, meta, num_classes, rows):
    # NUM_CLASSES set to the joint count (5 pretrained + 2 learned) is the likely slip with Mask2Former.
    cfg = swap_glyphs(glyph_cfg(str(tmp_path), meta=meta, num_classes=num_classes), "unused.pth")
    with pytest.raises(SwapConfigError) as err:
        SwapTrainer(cfg)
    assert rows in str(err.value)
    assert f"Set MODEL.SEM_SEG_HEAD.NUM_CLASSES to 5 (it is {num_classes}): the classes the checkpoint was trained " \
           "on, the stuff_classes of DATASETS.TRAIN[0]; the swap adds the 2 new classes itself." in str(err.value)


def test_checkpoint_that_does_not_fit_is_refused(glyph_spec, d2_pretrained, tmp_path):
    m2f = glyph_cfg(str(tmp_path), meta="MiniMask2Former")
    DetectionCheckpointer(build_model(m2f), str(tmp_path)).save("other_arch")
    trainer = SwapTrainer(swap_glyphs(glyph_cfg(str(tmp_path)), tmp_path / "other_arch.pth"))
    with pytest.raises(CheckpointMismatchError, match="does not fit the model: missing"):
        trainer.resume_or_load(resume=False)

    state = torch.load(d2_pretrained, weights_only=True)["model"]
    torch.save({"model": state, "meta": Path("not/a/tensor")}, tmp_path / "pickled.pth")
    trainer = SwapTrainer(swap_glyphs(glyph_cfg(str(tmp_path)), tmp_path / "pickled.pth"))
    with pytest.raises(CheckpointMismatchError, match="refuses"):
        trainer.resume_or_load(resume=False)


def test_label_table_ignores_unknown_and_ignored_labels():
    table = label_table(["bg", "a", "b"], {"b": 7, "bg": 0}, ignore_in=255, ignore_out=99)
    assert table[[0, 1, 2, 3, 255]].tolist() == [0, 99, 7, 99, 99]
