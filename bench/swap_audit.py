"""Unlearning audit on the demo task over seeds: is forgotten knowledge gone from the features, or hidden behind
the head?

Per pretraining seed (the demo's model and ``--seeds``), runs ``train.py --plugin swap --swap-audit`` (what users
run) for the demo's config (the default row), the demo's config with the feature MMD term
(``--swap-forget-loss-feature-mmd``, one row per ``--mmd-weights``) and LoRA fine-tuning on R∪L (no forgetting
term), and audits the oracle (trained from scratch on R∪L) the same way. Per model: forget accuracy, a linear
probe separating forgotten from retained digits on the pre-logits (balanced accuracy, 50 = chance; trained on
train images, scored on validation images), the forget accuracy after the relearn attack (5 images per forgotten
digit, every weight fine-tuned), after the revival test (fine-tuning on 10 images per retained digit only) and of
the prototype attack (nearest class mean of 5 train images per digit). The oracle has no output for the forgotten
digits: its audit first adds two new rows to its head (xavier, bias 0, as the swap adds a class), so its relearn
score is what 5 shots teach a model that never learned them.

The ``goal`` block (issue 25) is per MMD row, worst over seeds: probe and revival gap to the oracle (points;
goal <= 3 and <= 5), retain and learn cost against the default row (goal <= 1 each).

Usage: ``python bench/swap_audit.py [--seeds 0 1] [--no-demo-seed] [--mmd-weights 5] [--out FILE.json] [--add]``
(``--add``: add the seeds run to those ``--out`` holds, e.g. seeds 0 and 1 to an earlier run of the demo's seed)
(``--smoke``: 60 train images per class and 4-step phases, to check the bench runs; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
from prepare_data import prepare  # noqa: E402
from swap_mnist import pretrained_checkpoint  # noqa: E402
from swap_quality import METHODS, seed_flags, swap_report, train_oracle  # noqa: E402

FORGET = ["0", "1"]
DEFAULT = "default (demo config)"
FINETUNE = "finetune R∪L"
ORACLE = "oracle (R∪L from scratch)"
COLUMNS = ("forget_score", "probe_forget_vs_retain", "relearn_forget_score", "revival_forget_score",
           "prototype_forget_score")
SMOKE = ["--swap-learn-length", "4steps", "--swap-forget-length", "4steps"]


def mmd_row(weight: float) -> str:
    return f"feature MMD {weight:g}"


def audited_swap(name: str, flags: list[str], roots: dict[str, Path], ckpt: Path, out: Path) -> dict:
    """The swap's audit rows and its scores after the swap (for the costs)."""
    report, wall = swap_report(name, ["--swap-audit", *flags], roots, ckpt, out)
    audit = report["audit"]
    return {"pretrained": audit["pretrained"], "swapped": {**audit["swapped"], **report["metrics"]["after"],
                                                           "wall_s": wall}}


def audited_oracle(roots: dict[str, Path], out: Path, settings: dict, seed: int | None) -> dict:
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from kswap import AuditHost, AuditSettings, extend_head, run_audit
    from kswap.audit import few_shot_indices
    from kswap.data import drawn_indices
    from timm_swap.audit import PROBE_IMAGES
    from timm_swap.data import image_folder

    ctx, names, _ = train_oracle(roots, out, seed)
    model = ctx.model.eval()
    # rows for the forgotten digits after the oracle's 12 classes, initialised as the swap initialises a new class
    # (xavier, bias 0): the attack then teaches them from the same 5 shots the other models get
    model.head = extend_head(model.head, len(FORGET), trainable=True)
    audit_settings = AuditSettings(**settings, seed=0 if seed is None else seed)
    # the oracle's own label of each digit (its classes are sorted folder names)
    label_of = torch.tensor([len(names) + FORGET.index(str(d)) if str(d) in FORGET else names.index(str(d))
                             for d in range(10)])

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = image_folder(roots["mnist"], split, ctx.data_config)
        images, labels = zip(*DataLoader(data, batch_size=500), strict=True)
        return torch.cat(images), label_of[torch.cat(labels)]

    mnist = {split: load(split) for split in ("train", "val")}
    forget_ids = [len(names) + i for i in range(len(FORGET))]
    retain_ids = [names.index(str(d)) for d in range(10) if str(d) not in FORGET]
    # the probes' images: the same seeded draw the swap's audit makes of the same folders
    probe = {split: drawn_indices(len(y), PROBE_IMAGES, audit_settings.seed) for split, (_, y) in mnist.items()}
    is_forget = torch.isin(mnist["val"][1], torch.tensor(forget_ids))
    forget_x, forget_y = mnist["val"][0][is_forget], mnist["val"][1][is_forget]
    train_x, train_y = mnist["train"]
    labels = train_y.tolist()
    shots = few_shot_indices(labels, forget_ids, audit_settings.relearn_shots, audit_settings.seed)
    kept = few_shot_indices(labels, retain_ids, audit_settings.revival_shots, audit_settings.seed)

    def features(m: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = mnist["val" if split == "test" else "train"]
        idx = probe["val" if split == "test" else "train"]
        f = torch.cat([m.forward_head(m.forward_features(b), pre_logits=True) for b in x[idx].split(500)])
        return f, y[idx]

    host = AuditHost(
        features=features,
        forget_score=lambda m: 100.0 * float((m(forget_x).argmax(-1) == forget_y).float().mean()),
        attack_batches=[(train_x[shots], train_y[shots])],
        batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        retain_batches=list(zip(train_x[kept].split(80), train_y[kept].split(80), strict=True)),
    )
    return run_audit({"oracle": model}, host, forget_ids, audit_settings)["oracle"]


def one_seed(seed: int | None, weights: list[float], roots: dict[str, Path], out: Path, audit_flags: list[str],
             settings: dict, smoke: bool, rows: dict[str, dict], saved: Callable[[], None]) -> dict[str, str]:
    """Fill ``rows`` (``saved()`` after each, so a cut run keeps what it measured); returns the verdicts."""
    from kswap.audit import verdict

    ckpt = pretrained_checkpoint(roots["mnist"], seed)
    label = "the demo's seed" if seed is None else f"seed {seed}"
    runs = {DEFAULT: METHODS["learn_then_forget"], **{mmd_row(w): ["--swap-forget-loss-feature-mmd", str(w)]
                                                      for w in weights}, FINETUNE: METHODS["finetune R∪L"]}
    for name, flags in runs.items():
        if name == FINETUNE:  # the goal's rows first
            print(f"{label}: running the oracle ...", flush=True)
            rows[ORACLE] = audited_oracle(roots, out / f"seed{seed}", settings, seed)
            print(f"{label}: {ORACLE}: {row_line(rows[ORACLE])}", flush=True)
            saved()
        print(f"{label}: running {name} ...", flush=True)
        result = audited_swap(name, [*flags, *audit_flags, *seed_flags(seed), *(SMOKE if smoke else [])], roots,
                              ckpt, out / f"seed{seed}")
        rows.setdefault("pretrained", result["pretrained"])
        rows[name] = result["swapped"]
        print(f"{label}: {name}: {row_line(rows[name])}", flush=True)
        saved()
    settings_row = {"relearn_shots": settings["relearn_shots"], "prototype_shots": settings["prototype_shots"]}
    verdicts = {name: verdict({"settings": settings_row, "pretrained": rows["pretrained"], name: rows[name],
                               "oracle": rows[ORACLE]}, model=name) for name in runs}
    for name, line in verdicts.items():
        print(f"{label}: verdict {name}: {line}", flush=True)
    return verdicts


def row_line(row: dict) -> str:
    scores = "  ".join(f"{c.removesuffix('_forget_score').removesuffix('_score')} {row[c]:.2f}"
                       for c in COLUMNS if c in row)
    extra = "".join(f"  {s} {row[s]:.2f}" for s in ("retain", "learn") if s in row)
    return scores + extra


def goal(per_seed: dict[str, dict], row: str) -> dict:
    """The issue's goal block for ``row``: per seed and worst over seeds (points; costs against the default row)."""
    gaps = []
    for result in per_seed.values():
        r, oracle, default = result["rows"][row], result["rows"][ORACLE], result["rows"][DEFAULT]
        gaps.append({"probe_gap_to_oracle": r["probe_forget_vs_retain"] - oracle["probe_forget_vs_retain"],
                     "revival_gap_to_oracle": r["revival_forget_score"] - oracle["revival_forget_score"],
                     "retain_cost": default["retain"] - r["retain"], "learn_cost": default["learn"] - r["learn"]})
    worst = {key: max(g[key] for g in gaps) for key in gaps[0]}
    met = (worst["probe_gap_to_oracle"] <= 3 and worst["revival_gap_to_oracle"] <= 5 and worst["retain_cost"] <= 1
           and worst["learn_cost"] <= 1 and len(gaps) >= 3)
    return {"row": row, "seeds": list(per_seed), **worst, "met": met,
            "per_seed": dict(zip(per_seed, gaps, strict=True))}


def table(per_seed: dict[str, dict]) -> list[str]:
    header = f"{'seed':<8}{'model':<28}" + "".join(f"{h:>11}" for h in ("forget", "probe F/R", "relearn F",
                                                                       "revival F", "proto F", "retain", "learn"))
    lines = [header, "-" * len(header)]
    for seed, result in per_seed.items():
        for name, row in result["rows"].items():
            cells = [row.get(c) for c in (*COLUMNS, "retain", "learn")]
            lines.append(f"{seed:<8}{name:<28}" + "".join("          -" if v is None else f"{v:>11.2f}"
                                                          for v in cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_audit.json"))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1],
                        help="pretraining (and swap) seeds besides the demo's own model")
    parser.add_argument("--no-demo-seed", action="store_true", help="run only --seeds, not the demo's own model")
    parser.add_argument("--mmd-weights", nargs="+", type=float, default=[5.0],
                        help="--swap-forget-loss-feature-mmd of the option's rows")
    parser.add_argument("--relearn-steps", type=int, default=50)
    parser.add_argument("--relearn-lr", type=float, default=1e-4)
    parser.add_argument("--revival-steps", type=int, default=50)
    parser.add_argument("--revival-lr", type=float, default=1e-4)
    parser.add_argument("--smoke", action="store_true", help="60 train images per class and 4-step phases")
    parser.add_argument("--add", action="store_true",
                        help="keep the seeds --out already holds (a run of other seeds) and add these to them")
    args = parser.parse_args()
    settings = {"relearn_shots": 5, "relearn_steps": args.relearn_steps, "relearn_lr": args.relearn_lr,
                "revival_shots": 10, "revival_steps": args.revival_steps, "revival_lr": args.revival_lr,
                "prototype_shots": 5}
    audit_flags = [f"--swap-audit-{k.replace('_', '-')}={v}" for k, v in settings.items()]
    roots = prepare(per_class_train=60, per_class_val=20) if args.smoke else prepare(per_class_train=1000,
                                                                                     per_class_val=300)
    command = shlex.join(["python", "bench/swap_audit.py", *sys.argv[1:]])
    per_seed: dict[str, dict] = {}
    if args.add:
        earlier = json.loads(Path(args.out).read_text())
        command, per_seed = f"{earlier['command']} && {command}", earlier["per_seed"]

    def saved(**more: object) -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": command, "threads": os.environ.get("OMP_NUM_THREADS"),
                                              "settings": settings, **more, "per_seed": per_seed}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        for seed in [*([] if args.no_demo_seed else [None]), *args.seeds]:
            result = per_seed.setdefault("demo" if seed is None else str(seed), {"rows": {}})
            result["verdicts"] = one_seed(seed, args.mmd_weights, roots, Path(tmp), audit_flags, settings,
                                          args.smoke, result["rows"], lambda: saved(partial=True))
    goals = [goal(per_seed, mmd_row(w)) for w in args.mmd_weights]
    lines = table(per_seed)
    lines += [f"goal {g['row']} over {len(g['seeds'])} seed(s), worst: probe gap {g['probe_gap_to_oracle']:.2f} "
              f"(<= 3), revival gap {g['revival_gap_to_oracle']:.2f} (<= 5), retain cost {g['retain_cost']:.2f} "
              f"(<= 1), learn cost {g['learn_cost']:.2f} (<= 1): {'met' if g['met'] else 'not met'}" for g in goals]
    print("\n".join(lines))
    saved(goal=min(goals, key=lambda g: g["probe_gap_to_oracle"]), goals=goals, table=lines)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
