"""The detectron2 swap's numbers, checked against detectron2's own ``SemSegEvaluator``: "before" is the pretrained
model, a set's mIoU counts every labelled pixel of its images, periodic scores read a seeded subsample of each set
(and the report says which scores read what, and what scoring cost), the forgetting bound is checked at the start
of a forget phase, and the swapped model scores the same with detectron2's stock tools, without kswap.

Data and models as in ``test_detectron2_swap`` (composited real MNIST / Fashion-MNIST glyphs, a small
SemanticSegmentor trained here).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import SemSegEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from PIL import Image
from safetensors import safe_open
from torch import nn

from detectron2_swap import SetScorer, SwapPlan, per_class_iou, score_sets
from detectron2_swap.hook import logger as hook_logger
from kswap import ADAPTER_FILE, MODEL_FILE, SwapConfig, apply_adapter, file_sha256, loss_key, revert_adapter, score_key
from kswap.data import drawn_indices

from swap_testing.d2_models import TESTS_DIR, glyph_cfg, make_trainer_classes, register_datasets, run_swap, swap_glyphs

Trainer = make_trainer_classes()[0]
JOINT = ["background", "0", "1", "2", "3", "trouser", "bag"]
SETS = {"forget": ["3"], "retain": ["background", "0", "1", "2"], "learn": ["trouser", "bag"]}
DIGIT_3 = 4  # the label of digit 3 in the digits' label PNGs


@pytest.fixture(scope="module")
def swapped(glyph_spec, d2_pretrained, tmp_path_factory) -> Path:
    """A short learn-then-forget swap (long enough to move the scores) and its output directory."""
    out = tmp_path_factory.mktemp("swapped")
    run_swap(swap_glyphs(glyph_cfg(str(out)), d2_pretrained, learn=40, forget=8))
    return out


def stock_scores(model: nn.Module, cfg, dataset: str) -> dict[str, float]:
    """detectron2's own evaluation of ``model`` on ``dataset``: its per-class IoU."""
    loader = Trainer.build_test_loader(cfg, dataset)
    return inference_on_dataset(model, loader, SemSegEvaluator(dataset, distributed=False))["sem_seg"]


# -- item: "before" is the pretrained model ---------------------------------------------------------------------

def test_before_is_the_pretrained_model_as_detectron2_scores_it(glyph_spec, d2_pretrained, swapped, tmp_path):
    before = json.loads((swapped / "swap_report.json").read_text())["metrics"]["before"]
    cfg = glyph_cfg(str(tmp_path))  # the un-grown model the user trained, plain detectron2
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(d2_pretrained))
    iou = stock_scores(model, cfg, "glyph_digits_val")
    for name in ("forget", "retain"):  # the digits: the pretrained model's own label space
        assert before[name] == pytest.approx(np.mean([iou[f"IoU-{c}"] for c in SETS[name]]), abs=0.1), name
    assert before["learn"] == 0.0  # the pretrained model has no trouser or bag output
    assert before["retain"] > 50 and before["forget"] > 30  # a model that works: the comparison means something


# -- item: a set's mIoU counts every labelled pixel -------------------------------------------------------------

class PaintOneClass(nn.Module):
    """Predicts one class on every pixel: what a set mIoU that ignores other sets' pixels scores at 100."""

    def __init__(self, class_id: int, num_classes: int) -> None:
        super().__init__()
        self.class_id, self.num_classes = class_id, num_classes

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        out = []
        for x in batched_inputs:
            scores = torch.zeros(self.num_classes, x["height"], x["width"])
            scores[self.class_id] = 1.0
            out.append({"sem_seg": scores})
        return out


class GroundTruth(nn.Module):
    """Predicts each image's own labels, read from its label PNG and moved to the joint classes by name."""

    def __init__(self, datasets: list[str]) -> None:
        super().__init__()
        self.labels = {}
        for dataset in datasets:
            table = {i: JOINT.index(c) for i, c in enumerate(MetadataCatalog.get(dataset).stuff_classes)}
            for r in DatasetCatalog.get(dataset):
                self.labels[r["file_name"]] = (r["sem_seg_file_name"], table)

    def forward(self, batched_inputs: list[dict]) -> list[dict]:
        out = []
        for x in batched_inputs:
            path, table = self.labels[x["file_name"]]
            raw = torch.as_tensor(np.asarray(Image.open(path), dtype=np.int64))
            joint = torch.tensor([table.get(i, 0) for i in range(256)])[raw]  # ignored pixels: any class
            out.append({"sem_seg": torch.nn.functional.one_hot(joint, len(JOINT)).permute(2, 0, 1).float()})
        return out


def test_set_miou_counts_every_labelled_pixel_of_its_images(glyph_spec, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth")
    plan = SwapPlan.from_cfg(cfg)
    assert list(plan.space.names) == JOINT

    def score(model: nn.Module) -> dict[str, float]:
        return score_sets(model, plan, lambda name: Trainer.build_test_loader(cfg, name), distributed=False)

    painted = score(PaintOneClass(JOINT.index("3"), len(JOINT)))
    labels = [np.asarray(Image.open(r["sem_seg_file_name"])) for r in DatasetCatalog.get("glyph_digits_val")]
    threes = sum((x == DIGIT_3).sum() for x in labels) / sum((x != 255).sum() for x in labels)
    assert painted["forget"] == pytest.approx(100 * threes, abs=1e-6)
    assert painted["forget"] < 10, "painting the forget class everywhere must not score forget"
    assert painted["retain"] == painted["learn"] == 0.0

    perfect = score(GroundTruth(["glyph_digits_val", "glyph_clothes_val"]))
    assert perfect == {"forget": 100.0, "retain": 100.0, "learn": 100.0}



def test_pixels_of_classes_outside_the_joint_space_count_against_any_prediction(glyph_spec, tmp_path):
    # The digits' val images registered with a class the swap does not know ("sock" where the 3s are).
    records = DatasetCatalog.get("glyph_digits_val")
    register_datasets({"glyph_digits_val_sock": {"records": records,
                                                 "stuff_classes": ["background", "0", "1", "2", "sock"]}})
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth", DATASETS__RETAIN_TEST=("glyph_digits_val_sock",))
    plan = SwapPlan.from_cfg(cfg)
    table = plan.score_table("glyph_digits_val_sock")
    n = len(JOINT)
    assert table[[0, 1, 2, 3, 4, 255, 17]].tolist() == [0, 1, 2, 3, n, n + 1, n + 1]
    # Predicting "2" on 30 "2" pixels and 10 "sock" pixels: the sock pixels are false positives of "2".
    confusion = np.zeros((n + 2, n + 2), np.int64)
    confusion[3, 3], confusion[3, n], confusion[0, n + 1] = 30, 10, 50
    assert per_class_iou(confusion, JOINT, over=[3]) == {"mIoU": 75.0, "IoU-2": 75.0}


# -- item: periodic scores read a seeded subsample; the report says what each score read and what scoring cost ---

def pretrained_model(cfg, weights: Path) -> nn.Module:
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(weights))
    return model


def test_a_subsample_scores_its_drawn_images_and_the_scorer_builds_each_loader_once(glyph_spec, d2_pretrained,
                                                                                      tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth")
    plan = SwapPlan.from_cfg(cfg)
    model = pretrained_model(glyph_cfg(str(tmp_path)), d2_pretrained)
    built = []

    def loader(name: str):
        built.append(name)
        return Trainer.build_test_loader(cfg, name)

    scorer = SetScorer(plan, loader, distributed=False, subsample_images=30, seed=0)
    whole, images = scorer(model)
    assert images == dict.fromkeys(SETS, 100)
    assert whole == score_sets(model, plan, lambda name: Trainer.build_test_loader(cfg, name), distributed=False)
    sub, images = scorer(model, subsample=True)
    assert images == dict.fromkeys(SETS, 30)
    assert sub != whole

    # The same scores from plain score_sets on the seeded draw of each test dataset, registered as datasets.
    drawn = {}
    for dataset in ("glyph_digits_val", "glyph_clothes_val"):
        records = DatasetCatalog.get(dataset)
        drawn[dataset] = f"{dataset}_drawn30"
        register_datasets({drawn[dataset]: {"records": [records[i] for i in drawn_indices(len(records), 30, 0)],
                                            "stuff_classes": MetadataCatalog.get(dataset).stuff_classes}})
    by_hand = swap_glyphs(glyph_cfg(str(tmp_path)), "unused.pth",
                          DATASETS__FORGET_TEST=(drawn["glyph_digits_val"],),
                          DATASETS__RETAIN_TEST=(drawn["glyph_digits_val"],),
                          DATASETS__LEARN_TEST=(drawn["glyph_clothes_val"],))
    assert sub == score_sets(model, SwapPlan.from_cfg(by_hand), lambda name: Trainer.build_test_loader(cfg, name),
                             distributed=False)

    # Scoring again reads the same images through the loaders already built (forget and retain share theirs).
    assert scorer(model, subsample=True) == (sub, images) and scorer(model)[0] == whole
    assert len(built) == len(set(built)) == 4, built


def test_periodic_scores_read_a_subsample_and_the_report_says_so_and_times_scoring(glyph_spec, d2_pretrained,
                                                                                    tmp_path):
    run_swap(swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, learn=4, forget=4, EVAL_PERIOD=2, EVAL_IMAGES=30))
    report = json.loads((tmp_path / "swap_report.json").read_text())
    whole, sub = dict.fromkeys(SETS, 100), dict.fromkeys(SETS, 30)
    assert [(r["step"], r["images"], r["subsample"]) for r in report["curve"]] == [
        (0, whole, False), (2, sub, True), (4, whole, False), (6, sub, True), (8, whole, False)]
    timing = report["timing"]
    assert 0 < timing["scoring_s"] < timing["run_s"]
    markdown = (tmp_path / "swap_report.md").read_text()
    assert "before and after each phase: the whole test sets (forget 100, retain 100, learn 100 images)" in markdown
    assert "a seeded subsample of each set (forget 30, retain 30, learn 30 images)" in markdown
    assert f"scoring took {timing['scoring_s']:.0f} s of the run's {timing['run_s']:.0f} s" in markdown
    # metrics.json holds every score as scored (not detectron2's median of the scores so far), at the iteration it
    # was scored (step s ends iteration s - 1), though the writers' period (20) came only at the last iteration.
    records = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    logged = [(r["iteration"], {name: r[score_key(name)] for name in SETS})
              for r in records if score_key("forget") in r]
    assert logged == [(max(r["step"] - 1, 0), {name: r[name] for name in SETS}) for r in report["curve"]]


# -- item: the forgetting bound is checked at the start of each forget phase ---------------------------------------

def swap_with_bound(glyph_spec, d2_pretrained, out: Path, caplog, **loss) -> tuple[object, dict]:
    hook_logger.addHandler(caplog.handler)  # detectron2's logger does not propagate to the root logger
    try:
        cfg = swap_glyphs(glyph_cfg(str(out)), d2_pretrained, learn=1, forget=2,
                          **{f"FORGET_LOSS__{k}": v for k, v in loss.items()})
        trainer = run_swap(cfg)
    finally:
        hook_logger.removeHandler(caplog.handler)
    return trainer, json.loads((out / "swap_report.json").read_text())


def test_an_inactive_forgetting_bound_is_reported(glyph_spec, d2_pretrained, tmp_path, caplog):
    trainer, report = swap_with_bound(glyph_spec, d2_pretrained, tmp_path, caplog, BND=1e-3)
    first_forget_loss = trainer.storage.history(loss_key("forget/task")).values()[0][0]
    bound = report["forget_bounds"]["1_forget"]
    assert bound == {"measured_forget_loss": pytest.approx(first_forget_loss), "bnd": 1e-3, "relative": False,
                     "active": False}
    assert list(report["forget_bounds"]) == ["1_forget"]  # the learn phase has no forgetting term
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1_forget" in w and "nothing will be forgotten" in w for w in warnings), warnings
    # The EventStorage keys every host logs: the sets' scores and the phase-loss terms.
    logged = {k for k in trainer.storage.histories() if k.startswith("swap/")}
    scores = {score_key(name) for name in SETS}
    assert scores <= logged and all(k.startswith(loss_key("")) for k in logged - scores), logged
    assert {loss_key(t) for t in ("retain/task", "forget/task", "forget/bounded", "group_sparse")} <= logged
    assert trainer.storage.history(score_key("learn")).latest() == report["metrics"]["after"]["learn"]


def test_a_relative_forgetting_bound_is_resolved_from_the_measured_loss(glyph_spec, d2_pretrained, tmp_path, caplog):
    trainer, report = swap_with_bound(glyph_spec, d2_pretrained, tmp_path, caplog, BND=3.0, BND_RELATIVE=True)
    first_forget_loss = trainer.storage.history(loss_key("forget/task")).values()[0][0]
    bound = report["forget_bounds"]["1_forget"]
    assert bound["relative"] and bound["active"]
    assert bound["measured_forget_loss"] == pytest.approx(first_forget_loss)
    assert bound["bnd"] == pytest.approx(3 * first_forget_loss)
    session = trainer.swap_hook.session
    weights = session.weights(session.phases[1])  # what the model's loss used after the first forget step
    assert not weights.bnd_relative and weights.bnd == pytest.approx(bound["bnd"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# -- item: the outputs every host writes -----------------------------------------------------------------------

def test_the_pretrained_model_plus_the_adapter_is_the_merged_model(swapped, d2_pretrained):
    with safe_open(str(swapped / ADAPTER_FILE), "pt") as file:
        adapter, meta = {k: file.get_tensor(k) for k in file.keys()}, file.metadata()  # noqa: SIM118 (no dict)
    rows = {k: adapter.pop(k) for k in list(adapter) if ".lora_" not in k}  # the head's new rows, the rest LoRA
    assert {k: v.shape[0] for k, v in rows.items()} == {"rows.sem_seg_head.predictor.weight": 2,
                                                        "rows.sem_seg_head.predictor.bias": 2}
    config = SwapConfig.from_dict(json.loads(meta["swap_config"]))
    assert config.forget == ("3",) and config.learn_length.steps == 40 and json.loads(meta["classes"]) == SETS
    assert set(json.loads(meta["grown"])) == {"sem_seg_head.predictor.weight", "sem_seg_head.predictor.bias"}
    pretrained = torch.load(d2_pretrained, weights_only=True)["model"]
    merged = torch.load(swapped / MODEL_FILE, weights_only=True)
    assert merged["classes"] == JOINT
    layers = {k.split(".lora_A.")[0] for k in adapter if ".lora_A." in k}
    assert len(layers) == 4 and len(adapter) == 2 * len(layers)
    for key, weight in pretrained.items():
        layer = key.removesuffix(".weight")
        if layer in layers:  # W + scaling * B @ A
            a, b = (next(v for k, v in adapter.items() if k.startswith(f"{layer}.lora_{x}.")) for x in "AB")
            weight = weight + config.lora.scaling * b @ a
            assert not torch.equal(merged["model"][key], pretrained[key]), key
        if not key.startswith("sem_seg_head.predictor."):
            torch.testing.assert_close(merged["model"][key], weight, atol=1e-6, rtol=1e-5, msg=key)


def test_apply_adapter_to_the_pretrained_model_and_revert_it(swapped, d2_pretrained, tmp_path):
    model = build_model(glyph_cfg(str(tmp_path)))  # the plain model the user trained, its 5-class head
    DetectionCheckpointer(model).load(str(d2_pretrained))
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_adapter(model, swapped / ADAPTER_FILE)
    assert applied.adapter.round == 1 and applied.adapter.parent == file_sha256(d2_pretrained)
    merged = torch.load(swapped / MODEL_FILE, weights_only=True)["model"]
    assert set(model.state_dict()) == set(merged) and model.sem_seg_head.predictor.out_channels == len(JOINT)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, merged[key].to(value), atol=1e-6, rtol=1e-5, msg=key)
    revert_adapter(applied)
    assert set(model.state_dict()) == set(pretrained)
    assert all(torch.equal(v, pretrained[k]) for k, v in model.state_dict().items())


# -- item: detectron2's stock tools score the swapped model ----------------------------------------------------

def test_stock_detectron2_scores_the_swapped_model_as_the_report(swapped):
    report = json.loads((swapped / "swap_report.json").read_text())["metrics"]
    assert report["after"]["learn"] > 2, "the swap must have changed the model (the pretrained model scores 0 on learn)"
    script = textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        sys.path.insert(0, {str(TESTS_DIR)!r})
        from swap_testing import d2_models  # the test model's backbone and config keys (detectron2 only)
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.config import get_cfg
        from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
        from detectron2.evaluation import SemSegEvaluator, inference_on_dataset
        from detectron2.modeling import build_model

        out = {str(swapped)!r}
        # What the README shows: register the swapped test sets with plain detectron2.
        spec = json.load(open(os.path.join(out, "swapped_datasets.json")))
        for name, entry in spec["datasets"].items():
            DatasetCatalog.register(name, lambda records=entry["records"]: records)
            MetadataCatalog.get(name).set(stuff_classes=spec["stuff_classes"], ignore_label=spec["ignore_label"],
                                          evaluator_type="sem_seg")

        cfg = get_cfg(); d2_models.add_glyph_config(cfg); cfg.merge_from_file(os.path.join(out, "config_swapped.yaml"))
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        assert tuple(cfg.DATASETS.TEST) == tuple(spec["datasets"]), f"DATASETS.TEST is {{cfg.DATASETS.TEST}}"
        scores = {{}}
        for name in cfg.DATASETS.TEST:
            iou = inference_on_dataset(model, build_detection_test_loader(cfg, name),
                                       SemSegEvaluator(name, distributed=False))["sem_seg"]
            entry = spec["datasets"][name]
            scores[entry["set"]] = float(np.nanmean([iou["IoU-" + c] for c in entry["classes"]]))
        assert not {{"kswap", "peft", "detectron2_swap"}} & set(sys.modules), "stock scoring must not need them"
        print(json.dumps(scores))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"report": report, "stock": stock}))
    assert set(stock) == {"forget", "retain", "learn"}
    for name, value in stock.items():
        assert report["after"][name] == pytest.approx(value, abs=0.5), (name, report["after"], stock)


def register_swapped_sets(out: Path) -> dict:
    """README's registration of ``swapped_datasets.json`` (again, when an earlier test registered them)."""
    spec = json.loads((out / "swapped_datasets.json").read_text())
    for name, entry in spec["datasets"].items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda records=entry["records"]: records)
        MetadataCatalog.get(name).set(stuff_classes=spec["stuff_classes"], ignore_label=spec["ignore_label"],
                                      evaluator_type="sem_seg", swap_set=entry["set"], swap_classes=entry["classes"])
    return spec


def test_the_users_trainer_scores_each_swapped_set_into_its_folder_and_gives_its_score(swapped, tmp_path):
    # train_net.py --eval-only --config-file OUTPUT_DIR/config_swapped.yaml, with the Trainer the user swapped with.
    report = json.loads((swapped / "swap_report.json").read_text())["metrics"]["after"]
    spec = register_swapped_sets(swapped)
    cfg = glyph_cfg(str(tmp_path))
    cfg.merge_from_file(str(swapped / "config_swapped.yaml"))
    cfg.OUTPUT_DIR = str(tmp_path)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    results = make_trainer_classes()[1].test(cfg, model)
    for name, entry in spec["datasets"].items():
        stock = torch.load(tmp_path / "inference" / entry["set"] / "sem_seg_evaluation.pth", weights_only=False)
        expected = np.nanmean([stock[f"IoU-{c}"] for c in entry["classes"]])
        assert results[name][score_key(entry["set"])] == {"mIoU": pytest.approx(expected)}
        assert expected == pytest.approx(report[entry["set"]], abs=0.5)
        assert results[name]["sem_seg"]["mIoU"] == pytest.approx(stock["mIoU"])  # the stock results stay
