"""The unlearning audit on a tiny timm ViT and real handwritten digits (sklearn's 8x8 digits).

A model that "forgets" digit 0 only by suppressing its output row is the textbook case of hidden knowledge:
its forget accuracy is 0, yet a linear probe still finds the digit in its features and a few fine-tuning steps
bring it back. The audit must say so.
"""

import copy

import pytest
import torch
from torch.nn import functional as F

from kswap import AuditHost, AuditSettings, SwapReport, run_audit
from kswap.audit import (
    few_shot_indices,
    linear_probe_accuracy,
    nearest_classes,
    neighbour_mass,
    prototype_attack,
    relearn_attack,
    verdict,
)

from swap_testing.models import tiny_vit

FORGET = [0]


@pytest.fixture(scope="module")
def pretrained(digits):
    torch.manual_seed(0)
    x, y = digits
    keep = y[:1400] < 8
    xtr, ytr = x[:1400][keep], y[:1400][keep]
    model = tiny_vit(num_classes=8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        for idx in torch.randperm(len(xtr)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    return model.eval()


def _suppressed(model, digits):
    """The forget row's bias pushed just below every other logit on digit-0 images: forget accuracy 0, every
    feature intact (hidden, not forgotten)."""
    x, y = digits
    hidden = copy.deepcopy(model)
    with torch.no_grad():
        logits = model(x[y == FORGET[0]])
        others = torch.cat([logits[:, :FORGET[0]], logits[:, FORGET[0] + 1:]], dim=1)
        hidden.head.bias[FORGET] -= (logits[:, FORGET[0]] - others.max(1).values).max() + 1.0
    return hidden


def _damaged(model, digits):
    """Digit 0 "forgotten" by damage to the features: the final norm's shift moved along a retained class's head
    row until that class wins on every digit-0 image, at the cost of many retained images. Fine-tuning on retained
    images alone repairs it, and digit 0 comes back (how gradient ascent "forgets", arXiv 2505.22310)."""
    x, y = digits
    damaged = copy.deepcopy(model)
    step = 0.05 * model.head.weight[DAMAGE_CLASS].detach().sign()
    with torch.no_grad():
        while (damaged(x[y == FORGET[0]]).argmax(-1) != DAMAGE_CLASS).any():
            damaged.norm.bias += step
    return damaged


DAMAGE_CLASS = 6


def _host(digits):
    x, y = digits
    splits = {"train": (x[:1400], y[:1400]), "test": (x[1400:], y[1400:])}
    old = {s: (xs[ys < 8], ys[ys < 8]) for s, (xs, ys) in splits.items()}
    forget_test = old["test"][0][torch.isin(old["test"][1], torch.tensor(FORGET))]
    shots = few_shot_indices(old["train"][1].tolist(), FORGET, shots=5)
    batch = (old["train"][0][shots], old["train"][1][shots])
    retained = few_shot_indices(old["train"][1].tolist(), range(1, 8), shots=10)
    retain_batch = (old["train"][0][retained], old["train"][1][retained])

    def features(model, split):
        xs, ys = old[split]
        return model.forward_head(model.forward_features(xs), pre_logits=True), ys

    def forget_score(model):
        return 100.0 * float((model(forget_test).argmax(-1) == FORGET[0]).float().mean())

    return AuditHost(features=features, forget_score=forget_score, attack_batches=[batch],
                     batch_loss=lambda model, b: F.cross_entropy(model(b[0]), b[1]),
                     forget_probs=lambda model: model(forget_test).softmax(-1), retain_batches=[retain_batch])


def test_linear_probe_tells_separable_from_random(digits):
    x, y = digits
    flat = x.flatten(1)
    is_zero = (y == 0).long()
    assert linear_probe_accuracy(flat[:1400], is_zero[:1400], flat[1400:], is_zero[1400:]) > 90
    noise = torch.randn(len(y), 16, generator=torch.Generator().manual_seed(0))
    assert linear_probe_accuracy(noise[:1400], is_zero[:1400], noise[1400:], is_zero[1400:]) < 70


def test_few_shot_indices_per_class():
    labels = [0, 1, 0, 2, 0, 1, 0]
    picked = few_shot_indices(labels, [0, 1], shots=3, seed=1)
    assert sorted(labels[i] for i in picked) == [0, 0, 0, 1, 1]
    assert picked == few_shot_indices(labels, [0, 1], shots=3, seed=1)
    with pytest.raises(ValueError, match="no image of class 7"):
        few_shot_indices(labels, [7], shots=1)


def test_relearn_attack_leaves_the_model_alone(pretrained, digits):
    host = _host(digits)
    hidden = _suppressed(pretrained, digits)
    before = copy.deepcopy(hidden.state_dict())
    result = relearn_attack(hidden, host.attack_batches, host.batch_loss, host.forget_score, steps=20, lr=1e-3)
    assert set(result) == {"score", "steps", "lr"}
    assert all(torch.equal(v, before[k]) for k, v in hidden.state_dict().items())
    assert not hidden.training and host.forget_score(hidden) == 0.0


def test_neighbour_mass_and_nearest_classes():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1]])
    assert nearest_classes(probs, [0], k=2) == [1, 2]
    assert neighbour_mass(probs, [1, 2]) == pytest.approx(35.0)


def test_prototype_attack_finds_classes_the_features_keep(digits):
    x, y = digits
    flat, noise = x.flatten(1), torch.randn(len(y), 64, generator=torch.Generator().manual_seed(0))
    train, test = slice(0, 1400), slice(1400, None)
    # raw pixels keep the digits apart: five shots' mean finds most test zeros and ones (chance: 10)
    assert prototype_attack((flat[train], y[train]), (flat[test], y[test]), [0, 1], shots=5) > 55
    # features that hold nothing of the digits leave it at chance (1 in 10 classes)
    assert prototype_attack((noise[train], y[train]), (noise[test], y[test]), [0, 1], shots=5) < 30
    with pytest.raises(ValueError, match="no test feature of the forgotten classes"):
        prototype_attack((flat[train], y[train]), (flat[test][y[test] > 1], y[test][y[test] > 1]), [0, 1])


def test_verdict_against_the_oracle_and_without_one():
    def row(probe, forget, revival):
        return {"forget_score": forget, "probe_forget_vs_retain": probe, "revival_forget_score": revival,
                "relearn_forget_score": 50.0, "prototype_forget_score": 60.0}

    audit = {"settings": {"relearn_shots": 5, "prototype_shots": 5}, "pretrained": row(98.4, 97.8, 95.0),
             "swapped": row(98.7, 0.0, 30.0)}
    assert verdict(audit).startswith("features still separate forgotten classes: probe 98.7 vs pretrained 98.4;")
    assert "retain-only fine-tuning revives them: forget 0.0 -> 30.0" in verdict(audit)
    audit["oracle"] = row(91.8, 0.0, 0.0)
    assert "probe 98.7 vs pretrained 98.4, oracle 91.8" in verdict(audit)
    audit["swapped"] = row(93.0, 0.0, 2.0)
    assert verdict(audit).startswith("features no longer separate forgotten classes")
    assert "does not revive them" in verdict(audit)


def test_audit_finds_knowledge_hidden_behind_the_head(pretrained, digits, tmp_path):
    hidden = _suppressed(pretrained, digits)
    settings = AuditSettings(relearn_steps=30, relearn_lr=1e-2, revival_steps=30, revival_lr=1e-3)
    models = {"pretrained": pretrained, "swapped": hidden, "damaged": _damaged(pretrained, digits)}
    audit = run_audit(models, _host(digits), FORGET, settings)
    pre, swapped, damaged = audit["pretrained"], audit["swapped"], audit["damaged"]
    assert pre["forget_score"] > 60 and swapped["forget_score"] == 0.0
    # the features still hold digit 0: a probe finds it as well as in the pretrained model ...
    assert swapped["probe_forget_vs_retain"] > 85
    assert abs(swapped["probe_forget_vs_retain"] - pre["probe_forget_vs_retain"]) < 5
    # ... and five images bring it back: the forget score was hidden, not forgotten
    assert swapped["relearn_forget_score"] > 50
    assert swapped["probe_forget_classes"] is None  # one forgotten class: nothing to tell apart among them
    # class means of five shots find digit 0 in the swapped features as in the pretrained ones
    assert swapped["prototype_forget_score"] > 80
    assert abs(swapped["prototype_forget_score"] - pre["prototype_forget_score"]) < 5
    # retain images alone do not bring back a suppressed output row, but they repair damage, and digit 0 with it
    assert damaged["forget_score"] == 0.0 and damaged["revival_forget_score"] > 20, audit["verdict"]
    assert swapped["revival_forget_score"] < 5, swapped
    assert audit["verdict"].startswith("features still separate forgotten classes: probe "), audit["verdict"]
    assert swapped["neighbour_mass"] > pre["neighbour_mass"]  # suppressed mass went to the neighbours
    assert audit["settings"]["relearn_shots"] == 5 and len(audit["neighbours"]) == 3

    report = SwapReport(order="learn_then_forget", audit=audit)
    markdown = report.to_markdown()
    assert "## Unlearning audit" in markdown and "| swapped |" in markdown and "Verdict: features" in markdown
    assert SwapReport.from_dict(report.to_dict()).audit == audit
