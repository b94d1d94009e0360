import math

import pytest
import torch

from kswap import (
    LossWeights,
    PhaseLoss,
    SwapConfigError,
    SwapReport,
    bounded_forget_loss,
    distillation_loss,
    feature_mmd_loss,
    group_sparse_loss,
    sum_task_loss,
)


@pytest.mark.parametrize("loss_f, bnd, beta, expected", [
    (2.0, 105.0, 0.2, 0.2 * 103.0),   # below the bound: gradient ascent active
    (20.0, 15.0, 0.2, 0.0),           # above the bound: switched off
    (15.0, 15.0, 0.5, 0.0),
    (0.5, 1.0, 1.0, 0.5),
])
def test_bounded_forget_loss_values(loss_f, bnd, beta, expected):
    value = bounded_forget_loss(torch.tensor(loss_f), bnd, beta)
    assert value.item() == pytest.approx(expected)


def test_bounded_forget_loss_gradient_is_ascent_until_bound():
    below = torch.tensor(3.0, requires_grad=True)
    bounded_forget_loss(below, 10.0, 0.2).backward()
    assert below.grad.item() == pytest.approx(-0.2)
    above = torch.tensor(12.0, requires_grad=True)
    bounded_forget_loss(above, 10.0, 0.2).backward()
    assert above.grad.item() == 0.0


def test_group_sparse_loss_hand_computed():
    g1 = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]      # norm 5
    g2 = [torch.tensor([1.0, 2.0, 2.0])]                        # norm 3
    assert group_sparse_loss({"a": g1, "b": g2}).item() == pytest.approx(8.0)
    assert group_sparse_loss([g1, g2]).item() == pytest.approx(8.0)
    # not the plain L2 norm of everything (that would be sqrt(34))
    assert group_sparse_loss([g1 + g2]).item() == pytest.approx(math.sqrt(34))


def test_group_sparse_loss_gradient_and_zero_group():
    a = torch.tensor([3.0, 4.0], requires_grad=True)
    zero = torch.zeros(3, requires_grad=True)
    group_sparse_loss({"a": [a], "z": [zero]}).backward()
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]))
    assert torch.isfinite(zero.grad).all()
    with pytest.raises(ValueError, match="no LoRA tensors"):
        group_sparse_loss({})


def test_sum_task_loss_keeps_only_loss_terms():
    losses = {"loss_cls": torch.tensor(1.0), "loss_bbox": [torch.tensor(0.5), torch.tensor([0.25, 0.75])],
              "loss_mask": torch.tensor([1.0, 3.0]), "acc": torch.tensor(99.0)}
    # mmengine's parse_losses: a multi-element term counts as its mean
    assert sum_task_loss(losses).item() == pytest.approx(1.0 + 0.5 + 0.5 + 2.0)
    assert sum_task_loss(losses, is_loss=lambda k: True).item() == pytest.approx(103.0)
    assert sum_task_loss(torch.tensor(2.5)).item() == 2.5
    with pytest.raises(ValueError, match="no loss term"):
        sum_task_loss({"acc": torch.tensor(1.0)})


def test_phase_loss_learn_phase():
    w = LossWeights(retain_weight=0.2, learn_weight=1.0, alpha=0.005)
    out = PhaseLoss(w)({"retain": torch.tensor(2.0), "learn": torch.tensor(3.0)}, gs=torch.tensor(10.0))
    assert out.total.item() == pytest.approx(0.2 * 2 + 3 + 0.005 * 10)
    assert set(out.terms) == {"retain/task", "learn/task", "group_sparse", "total"}


def test_phase_loss_forget_phase_with_host_dicts():
    w = LossWeights(retain_weight=1.0, beta=0.2, bnd=15.0, alpha=0.01)
    retain = {"loss_cls": torch.tensor(1.0), "loss_bbox": torch.tensor(2.0), "acc": torch.tensor(50.0)}
    forget = {"loss_cls": torch.tensor(4.0), "loss_bbox": torch.tensor(1.0)}
    out = PhaseLoss(w)({"retain": retain, "forget": forget}, gs=torch.tensor(2.0))
    assert out.total.item() == pytest.approx(3.0 + 0.2 * (15 - 5) + 0.01 * 2)
    assert out.terms["forget/bounded"].item() == pytest.approx(2.0)
    assert out.terms["retain/loss_bbox"].item() == 2.0 and out.terms["retain/acc"].item() == 50.0
    assert out.terms["forget/task"].item() == 5.0


def test_phase_loss_joint_and_detectron2_style_keys():
    w = LossWeights(retain_weight=1.0, learn_weight=0.9, beta=0.2, bnd=115.0, alpha=0.01)
    every_key = PhaseLoss(w, is_loss=lambda k: True)
    out = every_key({"retain": {"ce": torch.tensor(1.0)}, "learn": {"ce": torch.tensor(2.0)},
                     "forget": {"ce": torch.tensor(100.0), "dice": torch.tensor(20.0)}})
    assert out.total.item() == pytest.approx(1.0 + 0.9 * 2 + 0.0)
    with pytest.raises(ValueError, match="Unknown loss roles"):
        every_key({"other": torch.tensor(1.0)})


def test_relative_bound_is_measured_then_resolved_by_the_report():
    w = LossWeights(beta=0.5, bnd=3.0, bnd_relative=True)
    first = PhaseLoss(w)({"forget": torch.tensor(2.0)})
    assert first.terms["forget/bounded"].item() == pytest.approx(0.5 * (3 * 2.0 - 2.0))  # measured on this batch
    report = SwapReport(order="learn_then_forget")
    assert report.phase_weights("1_forget", w) is w  # nothing measured yet
    assert report.start_forget_phase("1_forget", w, 2.0) is None
    resolved = report.phase_weights("1_forget", w)
    assert (resolved.bnd, resolved.bnd_relative) == (6.0, False)
    later = PhaseLoss(resolved)({"forget": torch.tensor(5.0)})
    assert later.terms["forget/bounded"].item() == pytest.approx(0.5 * (6.0 - 5.0))
    assert SwapReport.from_dict(report.to_dict()).phase_weights("1_forget", w).bnd == 6.0  # survives a resume
    with pytest.raises(SwapConfigError, match="must be > 1"):
        LossWeights(bnd=1.0, bnd_relative=True).validate("forget_loss")


def test_an_inactive_absolute_bound_is_reported():
    report = SwapReport(order="learn_then_forget")
    warning = report.start_forget_phase("1_forget", LossWeights(bnd=15.0), 35.0)
    assert "already at or above the forgetting bound BND=15" in warning and "bnd_relative" in warning
    assert report.forget_bounds["1_forget"] == {"measured_forget_loss": 35.0, "bnd": 15.0, "relative": False,
                                                "active": False}
    assert "INACTIVE" in report.to_markdown()
    assert report.start_forget_phase("3_forget", LossWeights(bnd=15.0), 2.0) is None


def test_distillation_loss_is_zero_at_the_teacher_and_pulls_towards_it():
    teacher = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert distillation_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-7)
    student = torch.zeros(2, 3, requires_grad=True)
    loss = distillation_loss(student, teacher, temperature=2.0)
    loss.backward()
    assert loss.item() > 0
    # a gradient step raises the logits the teacher prefers
    assert (-student.grad[0, 0]) > 0 and (-student.grad[0, 2]) < 0


def test_phase_loss_weights_the_distill_term():
    weights = LossWeights(retain_weight=1.0, beta=0.0, alpha=0.0, distill=0.5)
    out = PhaseLoss(weights)({"retain": torch.tensor(1.0)}, distill=torch.tensor(4.0))
    assert out.total.item() == pytest.approx(1.0 + 0.5 * 4.0)
    assert out.terms["retain/distill"].item() == 4.0
    with pytest.raises(SwapConfigError, match="distill must be >= 0"):
        LossWeights(distill=-1.0).validate("forget_loss")


def test_feature_mmd_moves_forget_features_into_the_retain_distribution():
    gen = torch.Generator().manual_seed(0)
    retain = torch.randn(64, 16, generator=gen)
    same = torch.randn(64, 16, generator=gen)
    apart = (torch.randn(64, 16, generator=gen) + 3.0).requires_grad_()
    assert feature_mmd_loss(same, retain) < 0.1 * feature_mmd_loss(apart, retain)
    loss = feature_mmd_loss(apart, retain.requires_grad_())
    loss.backward()
    assert retain.grad is None  # the retain features are the target, not moved
    # descending the term moves the forget features towards the retain ones (whose mean is 0)
    assert (apart.grad.mean(0) > 0).all()
    out = PhaseLoss(LossWeights(retain_weight=1.0, beta=0.0, alpha=0.0, feature_mmd=2.0))(
        {"retain": torch.tensor(1.0)}, feature_mmd=torch.tensor(0.25))
    assert out.total.item() == pytest.approx(1.5) and out.terms["forget/feature_mmd"].item() == 0.25
    with pytest.raises(SwapConfigError, match="feature_mmd must be >= 0"):
        LossWeights(feature_mmd=-1.0).validate("forget_loss")
