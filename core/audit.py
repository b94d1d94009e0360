"""Unlearning audit: evidence that forgotten knowledge is gone, not only hidden behind the head.

A forget score of 0 says the head no longer outputs the forgotten classes. These host-agnostic checks look
further (see "Are We Truly Forgetting?", arXiv 2503.06991, and relearning attacks on unlearning):

* ``probe_scores``: a linear probe on the model's features. If a fresh linear layer still separates the
  forgotten classes (among themselves, and from the retained ones), the representation kept them.
* ``relearn_attack``: fine-tune a copy of the model on ``k`` images per forgotten class for ``N`` steps and
  score the forget set again. Knowledge that was only hidden comes back in a few steps.
* the revival test (``relearn_attack`` on retain batches): fine-tune a copy on retain images only, with the
  host's own loss, and score the forget set again. Forgetting that only sits on top of the pretrained solution
  comes back without a single forget image ("From Dormant to Deleted", arXiv 2505.22310).
* ``prototype_attack``: nearest class mean on the model's features from ``k`` train images per class, scored on
  the forget test images; no weight changes (the few-shot prototype attack of arXiv 2506.01318).
* ``neighbour_mass``: a cheap membership-style signal, the probability mass a classifier puts on the classes
  the pretrained model confused most with the forgotten ones. A model that never learned the forget classes
  spreads forget images over their neighbours; one that only suppressed the output rows may do so differently.

The host supplies features, a loss for a batch and a scorer; nothing here changes the model it is given.
``verdict`` says in one line what the rows mean.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class AuditSettings:
    """How the audit runs.

    Args:
        probe_steps: full-batch optimisation steps of each linear probe (L-BFGS iterations).
        relearn_shots: images per forgotten class given to the relearn attack (``k``).
        relearn_steps: optimizer steps of the relearn attack (``N``).
        relearn_lr: AdamW learning rate of the relearn attack, on every weight of the merged model.
        revival_shots: retain images per retained class given to the revival test.
        revival_steps: optimizer steps of the revival test (fine-tuning on retain images only).
        revival_lr: AdamW learning rate of the revival test, on every weight of the merged model.
        prototype_shots: train images per class whose mean feature is its prototype in the prototype attack.
        neighbours: how many classes count as the forgotten classes' neighbours in ``neighbour_mass``.
        seed: seed of the few-shot draws.
    """

    probe_steps: int = 100
    relearn_shots: int = 5
    relearn_steps: int = 50
    relearn_lr: float = 1e-4
    revival_shots: int = 10
    revival_steps: int = 50
    revival_lr: float = 1e-4
    prototype_shots: int = 5
    neighbours: int = 3
    seed: int = 0


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, steps: int = 100) -> float:
    """Balanced accuracy (percent) of a linear classifier fitted on ``train_x`` and scored on ``test_x``.

    Features are standardised with the train statistics; the probe is a softmax regression with a small L2
    penalty, fitted by L-BFGS (deterministic, no learning rate to tune). Balanced accuracy (the mean per-class
    recall) keeps a majority class from reading as separability.
    """
    classes = torch.unique(torch.cat([train_y, test_y]))
    to_index = {int(c): i for i, c in enumerate(classes)}
    ytr = torch.tensor([to_index[int(c)] for c in train_y])
    yte = torch.tensor([to_index[int(c)] for c in test_y])
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xtr, xte = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(xtr.shape[1], len(classes), dtype=xtr.dtype)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(xtr), ytr) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = probe(xte).argmax(-1)
    recalls = [(pred[yte == c] == c).float().mean() for c in yte.unique()]
    return 100.0 * float(torch.stack(recalls).mean())


def probe_scores(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 forget_ids: Sequence[int], steps: int = 100) -> dict[str, float | None]:
    """Linear-probe accuracies on features of forget and retain images.

    Args:
        train: features ``(N, D)`` and joint-space labels of the probe's training images.
        test: the same for the images it is scored on.
        forget_ids: the forgotten classes' ids.

    Returns:
        ``forget_classes``: the forgotten classes told apart among themselves (``None`` with one forget class);
        ``forget_vs_retain``: forgotten against retained images (two classes).
    """
    forget = torch.tensor(list(forget_ids))
    (xtr, ytr), (xte, yte) = train, test
    out: dict[str, float | None] = {"forget_classes": None}
    if len(forget) > 1:
        ftr, fte = torch.isin(ytr, forget), torch.isin(yte, forget)
        out["forget_classes"] = linear_probe_accuracy(xtr[ftr], ytr[ftr], xte[fte], yte[fte], steps)
    out["forget_vs_retain"] = linear_probe_accuracy(xtr, torch.isin(ytr, forget).long(), xte,
                                                    torch.isin(yte, forget).long(), steps)
    return out


def few_shot_indices(labels: Sequence[int], class_ids: Iterable[int], shots: int, seed: int = 0) -> list[int]:
    """``shots`` indices per class of ``class_ids`` (fewer where a class has fewer), drawn with ``seed``."""
    labels_t = torch.as_tensor(list(labels))
    gen = torch.Generator().manual_seed(seed)
    picked: list[int] = []
    for c in class_ids:
        idx = torch.nonzero(labels_t == c).flatten()
        if len(idx) == 0:
            raise ValueError(f"The relearn attack found no image of class {c} to fine-tune on.")
        picked += idx[torch.randperm(len(idx), generator=gen)[:shots]].tolist()
    return picked


def relearn_attack(model: nn.Module, batches: Sequence[Any], batch_loss: Callable[[nn.Module, Any], torch.Tensor],
                   score: Callable[[nn.Module], float], steps: int = 50, lr: float = 1e-4) -> dict[str, float]:
    """Fine-tune a copy of ``model`` on a few forget-class batches and score it again.

    Every weight of the copy trains (the strongest attacker that holds the released model); ``model`` itself
    is never changed.

    Args:
        model: the model to attack (the merged, exported one).
        batches: the attack's training batches, cycled for ``steps`` steps.
        batch_loss: the host's task loss of a batch under a model in training mode.
        score: the host's forget-set score of a model (percent), called in eval mode.
        steps: optimizer steps.
        lr: AdamW learning rate.

    Returns:
        ``score`` after the attack, with ``steps`` and ``lr``.
    """
    if not batches:
        raise ValueError("relearn_attack got no batch to fine-tune on.")
    attacked = copy.deepcopy(model)
    attacked.requires_grad_(True).train()
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr, weight_decay=0.0)
    with torch.enable_grad():
        for step in range(steps):
            opt.zero_grad()
            batch_loss(attacked, batches[step % len(batches)]).backward()
            opt.step()
    attacked.eval()
    with torch.no_grad():
        after = float(score(attacked))
    return {"score": after, "steps": steps, "lr": lr}


def prototype_attack(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                     forget_ids: Sequence[int], shots: int = 5, seed: int = 0) -> float:
    """Forget-test accuracy (percent, mean over the forgotten classes) of a nearest-class-mean classifier.

    The prototype of each class in ``train`` is the mean of ``shots`` of its features (a seeded draw); features
    are centred on the mean train feature and L2-normalised first (SimpleShot's CL2N), and each forget test
    feature goes to the prototype of highest cosine similarity, among every class of ``train``.

    Args:
        train: features ``(N, D)`` and joint-space labels the shots are drawn from.
        test: features and labels of the images scored (only those of ``forget_ids`` are).
        forget_ids: the forgotten classes' ids.
    """
    (xtr, ytr), (xte, yte) = train, test
    classes = torch.unique(ytr)
    center = xtr.mean(0)

    def normalised(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x - center, dim=-1)

    picked = torch.tensor(few_shot_indices(ytr.tolist(), classes.tolist(), shots, seed))
    shot_x, shot_y = normalised(xtr[picked]), ytr[picked]
    prototypes = F.normalize(torch.stack([shot_x[shot_y == c].mean(0) for c in classes]), dim=-1)
    forget = torch.isin(yte, torch.tensor(list(forget_ids)))
    if not forget.any():
        raise ValueError(f"prototype_attack got no test feature of the forgotten classes {list(forget_ids)}.")
    pred = classes[(normalised(xte[forget]) @ prototypes.T).argmax(-1)]
    truth = yte[forget]
    return 100.0 * float(torch.stack([(pred[truth == c] == c).float().mean() for c in truth.unique()]).mean())


def nearest_classes(pretrained_probs: torch.Tensor, forget_ids: Sequence[int], k: int) -> list[int]:
    """The ``k`` non-forget classes with the most pretrained probability mass on forget images."""
    mass = pretrained_probs.mean(0).clone()
    mass[list(forget_ids)] = -1.0
    return mass.topk(min(k, int((mass >= 0).sum()))).indices.tolist()


def neighbour_mass(probs: torch.Tensor, neighbour_ids: Sequence[int]) -> float:
    """Mean probability mass (percent) on ``neighbour_ids`` over the rows of ``probs`` (forget images)."""
    return 100.0 * float(probs[:, list(neighbour_ids)].sum(-1).mean())


Features = tuple[torch.Tensor, torch.Tensor]


@dataclass
class AuditHost:
    """What a host gives the audit, as callables over a model.

    Args:
        features: ``(model, split)`` with split ``"train"`` or ``"test"`` -> features ``(N, D)`` and joint-space
            labels of that split's forget and retain images (classification: the pre-logits).
        forget_score: the host's forget-set score of a model, in percent.
        attack_batches: the relearn attack's batches (``k`` images per forgotten class, from the train split).
        batch_loss: the host's task loss of one of those batches (or of ``retain_batches``') under a model in
            training mode.
        forget_probs: class probabilities of a model on the forget test images, where the task has them
            (classification); ``None`` leaves the membership-style signal out.
        retain_batches: the revival test's batches (``revival_shots`` train images per retained class, labelled
            as the swap trained on them); empty leaves the revival test out.
    """

    features: Callable[[nn.Module, str], Features]
    forget_score: Callable[[nn.Module], float]
    attack_batches: Sequence[Any]
    batch_loss: Callable[[nn.Module, Any], torch.Tensor]
    forget_probs: Callable[[nn.Module], torch.Tensor] | None = None
    retain_batches: Sequence[Any] = ()


def run_audit(models: Mapping[str, nn.Module], host: AuditHost, forget_ids: Sequence[int],
              settings: AuditSettings = AuditSettings()) -> dict[str, Any]:
    """Audit each model (``pretrained`` first, then ``swapped``, and in a bench e.g. ``oracle``).

    Returns:
        Per model: ``forget_score``, ``probe_forget_vs_retain``, ``probe_forget_classes`` (None with one forget
        class), ``relearn_forget_score``, ``prototype_forget_score``, with ``retain_batches``
        ``revival_forget_score`` and, with ``forget_probs``, ``neighbour_mass`` on the classes the first model
        confused most with the forgotten ones; plus ``settings`` and, with ``pretrained`` and ``swapped`` rows,
        the ``verdict``. This is ``SwapReport.audit``.
    """
    out: dict[str, Any] = {"settings": asdict(settings)}
    neighbours: list[int] | None = None
    for name, model in models.items():
        was_training = model.training
        model.eval()
        with torch.no_grad():
            train, test = host.features(model, "train"), host.features(model, "test")
            row: dict[str, float | None] = {"forget_score": float(host.forget_score(model))}
        probe = probe_scores(train, test, forget_ids, settings.probe_steps)
        row["probe_forget_vs_retain"] = probe["forget_vs_retain"]
        row["probe_forget_classes"] = probe["forget_classes"]
        attack = relearn_attack(model, host.attack_batches, host.batch_loss, host.forget_score,
                                settings.relearn_steps, settings.relearn_lr)
        row["relearn_forget_score"] = attack["score"]
        if host.retain_batches:
            revival = relearn_attack(model, host.retain_batches, host.batch_loss, host.forget_score,
                                     settings.revival_steps, settings.revival_lr)
            row["revival_forget_score"] = revival["score"]
        row["prototype_forget_score"] = prototype_attack(train, test, forget_ids, settings.prototype_shots,
                                                         settings.seed)
        if host.forget_probs is not None:
            with torch.no_grad():
                probs = host.forget_probs(model)
            neighbours = neighbours or nearest_classes(probs, forget_ids, settings.neighbours)
            row["neighbour_mass"] = neighbour_mass(probs, neighbours)
        model.train(was_training)
        out[name] = row
    if neighbours is not None:
        out["neighbours"] = neighbours
    if "pretrained" in out and "swapped" in out:
        out["verdict"] = verdict(out)
    return out


# How far (points) a swapped model's probe may sit above the oracle's, and its forget score rise under the revival
# test, and still count as forgotten (the bench's goal, issue 25).
PROBE_TOLERANCE = 3.0
REVIVAL_TOLERANCE = 5.0


def verdict(audit: Mapping[str, Any], model: str = "swapped", reference: str = "pretrained",
            oracle: str = "oracle") -> str:
    """One plain line on ``audit[model]``, against the ``reference`` row and an ``oracle`` row where there is one
    (a model that never learned the forgotten classes, e.g. in a bench).

    Features "still separate" the forgotten classes when the probe reads within ``PROBE_TOLERANCE`` of the
    pretrained probe (no oracle), or more than that above the oracle's; retain-only fine-tuning "revives" them
    when the forget score climbs more than ``REVIVAL_TOLERANCE`` (above the oracle's revival, with one).
    """
    row, pre, orc = audit[model], audit[reference], audit.get(oracle)

    def versus(key: str) -> str:
        return f"{reference} {pre[key]:.1f}" + (f", oracle {orc[key]:.1f}" if orc and orc.get(key) is not None
                                                else "")

    probe = row["probe_forget_vs_retain"]
    kept = probe > orc["probe_forget_vs_retain"] + PROBE_TOLERANCE if orc else \
        probe >= pre["probe_forget_vs_retain"] - PROBE_TOLERANCE
    parts = [f"features {'still separate' if kept else 'no longer separate'} forgotten classes: probe {probe:.1f} "
             f"vs {versus('probe_forget_vs_retain')}"]
    if row.get("revival_forget_score") is not None:
        revived = row["revival_forget_score"]
        floor = orc["revival_forget_score"] if orc and orc.get("revival_forget_score") is not None \
            else row["forget_score"]
        word = "revives" if revived > floor + REVIVAL_TOLERANCE else "does not revive"
        parts.append(f"retain-only fine-tuning {word} them: forget {row['forget_score']:.1f} -> {revived:.1f} "
                     f"({versus('revival_forget_score')})")
    parts.append(f"{audit['settings']['relearn_shots']} shots per class relearn them to "
                 f"{row['relearn_forget_score']:.1f} ({versus('relearn_forget_score')})")
    parts.append(f"class means of {audit['settings']['prototype_shots']} shots find them at "
                 f"{row['prototype_forget_score']:.1f} ({versus('prototype_forget_score')})")
    return "; ".join(parts)
