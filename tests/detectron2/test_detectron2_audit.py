"""The unlearning audit in detectron2 (``SWAP.AUDIT``): probes on mask-pooled features, the relearn attack and the
neighbour mass for the pretrained and the swapped model, in the swap report, without touching the export.

Data and model as in ``test_detectron2_swap`` (composited real MNIST / Fashion-MNIST glyphs, a small
SemanticSegmentor trained here).
"""

from __future__ import annotations

import json

import pytest
import torch

from detectron2_swap import audit_settings_from_cfg
from detectron2_swap.audit import mask_pooled
from kswap import AuditSettings, SwapConfigError, merge_and_export

from swap_testing.d2_models import glyph_cfg, run_swap, swap_glyphs


def test_audit_keys_are_the_audit_settings_upper_cased(tmp_path):
    cfg = glyph_cfg(str(tmp_path))
    assert cfg.SWAP.AUDIT.ENABLED is False
    assert audit_settings_from_cfg(cfg) == AuditSettings()
    cfg.merge_from_list(["SWAP.AUDIT.RELEARN_SHOTS", 2, "SWAP.AUDIT.RELEARN_STEPS", 7, "SWAP.AUDIT.RELEARN_LR", 1e-3])
    assert audit_settings_from_cfg(cfg) == AuditSettings(relearn_shots=2, relearn_steps=7, relearn_lr=1e-3)
    cfg.SWAP.AUDIT.RELEARN_SHOTS = 0
    with pytest.raises(SwapConfigError, match="SWAP.AUDIT.RELEARN_SHOTS"):
        audit_settings_from_cfg(cfg)


def test_audit_mask_pooling_averages_each_class_over_its_pixels():
    # a 2-channel 2x2 feature map at stride 2 of a 4x4 padded input; the image is 3x4 (one padded row)
    features = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]])
    labels = torch.tensor([[0, 0, 5, 5], [0, 0, 5, 5], [7, 7, 7, 7]])
    pooled, classes = mask_pooled(features, (4, 4), labels, keep=torch.tensor([0, 7]))
    assert classes.tolist() == [0, 7]  # class 5 is not kept
    assert torch.allclose(pooled[0], torch.tensor([1.0, 10.0]))  # the top-left cell only
    assert torch.allclose(pooled[1], torch.tensor([3.5, 35.0]))  # one row in each bottom cell


def test_audit_reports_probe_relearn_and_neighbour_mass_for_segmentation(glyph_spec, d2_pretrained, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, learn=40, forget=8, AUDIT__ENABLED=True,
                      AUDIT__RELEARN_STEPS=10, AUDIT__RELEARN_LR=1e-3, AUDIT__REVIVAL_SHOTS=2,
                      AUDIT__REVIVAL_STEPS=5, AUDIT__REVIVAL_LR=1e-3, AUDIT__PROBE_IMAGES=150)
    trainer = run_swap(cfg)
    report = json.loads((tmp_path / "swap_report.json").read_text())
    audit, before, after = report["audit"], report["metrics"]["before"], report["metrics"]["after"]
    pre, swapped = audit["pretrained"], audit["swapped"]
    # the audit scores the models the report scored: the pretrained one and the merged export
    assert pre["forget_score"] == pytest.approx(before["forget"], abs=0.1)
    assert swapped["forget_score"] == pytest.approx(after["forget"], abs=0.1)
    assert pre["probe_forget_vs_retain"] > 80  # digit 3's pixels are linearly apart in the pretrained features
    for row in (pre, swapped):
        for key in ("relearn_forget_score", "revival_forget_score", "prototype_forget_score", "neighbour_mass"):
            assert 0 <= row[key] <= 100, (key, row)
        assert row["probe_forget_classes"] is None  # one forgotten class
    # ten steps on five images of digit 3 bring part of it back (about 28 -> 42 here)
    assert swapped["relearn_forget_score"] > swapped["forget_score"] + 3
    assert audit["settings"] == {"probe_steps": 100, "relearn_shots": 5, "relearn_steps": 10, "relearn_lr": 1e-3,
                                 "revival_shots": 2, "revival_steps": 5, "revival_lr": 1e-3, "prototype_shots": 5,
                                 "neighbours": 3, "seed": 0}
    assert f"Verdict: {audit['verdict']}." in (tmp_path / "swap_report.md").read_text()
    # the attack fine-tuned copies: the exported model is the swapped model itself
    exported = torch.load(tmp_path / "model_swapped.pth", weights_only=True)["model"]
    merged = merge_and_export(trainer.model).state_dict()
    assert exported.keys() == merged.keys() and all(torch.equal(exported[k], v) for k, v in merged.items())


def test_audit_features_module_that_does_not_exist_fails_before_training(glyph_spec, d2_pretrained, tmp_path):
    cfg = swap_glyphs(glyph_cfg(str(tmp_path)), d2_pretrained, AUDIT__ENABLED=True,
                      AUDIT__FEATURES="sem_seg_head.nope")
    with pytest.raises(SwapConfigError, match="SWAP.AUDIT.FEATURES"):
        run_swap(cfg)
    assert not (tmp_path / "model_swap_learn.pth").exists()
