"""Unlearning audit on the demo task, side by side: is forgotten knowledge gone, or hidden behind the head?

Runs ``train.py --plugin swap --swap-audit`` (what users run) for learn_then_forget (the demo's config), the
reference recipe, forget_then_learn, LoRA fine-tuning on R∪L (no forgetting term) and unbounded gradient ascent,
and audits the oracle (trained from
scratch on R∪L) the same way. Per model: forget accuracy, a linear probe separating forgotten from retained
digits on the pre-logits (balanced accuracy, 50 = chance), and the forget accuracy after the relearn attack
(5 images per forgotten digit, every weight fine-tuned). The oracle has no output for the forgotten digits: its
audit first adds two new rows to its head (xavier, bias 0, as the swap adds a class), so its relearn score is what
5 shots teach a model that never learned them.

Usage: ``python bench/swap_audit.py [--out bench/results/swap_audit.json] [--relearn-steps 50 --relearn-lr 1e-4]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))
sys.path.insert(0, str(ROOT / "bench"))
from prepare_data import prepare  # noqa: E402
from swap_mnist import pretrained_checkpoint  # noqa: E402
from swap_quality import METHODS, swap_report, train_oracle  # noqa: E402

# learn_then_forget is the demo's config (attention + FFN LoRA, forget-phase distillation); the reference row is
# the paper's recipe on the same task.
AUDITED = ["learn_then_forget", "reference (FFN LoRA, no distill)", "forget_then_learn", "finetune R∪L",
           "unbounded GA"]
FORGET = ["0", "1"]
COLUMNS = ("forget_score", "probe_forget_vs_retain", "relearn_forget_score")


def audited_swap(name: str, roots: dict[str, Path], ckpt: Path, out: Path, attack: list[str]) -> dict:
    report, wall = swap_report(name, ["--swap-audit", *attack, *METHODS[name]], roots, ckpt, out)
    audit = report["audit"]
    return {"pretrained": audit["pretrained"], "swapped": audit["swapped"], "wall_s": wall}


def audited_oracle(roots: dict[str, Path], out: Path, steps: int, lr: float) -> dict:
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from kswap import AuditHost, AuditSettings, extend_head, run_audit
    from kswap.audit import few_shot_indices
    from timm_swap.data import image_folder

    ctx, names, _ = train_oracle(roots, out)
    model = ctx.model.eval()
    # rows for the forgotten digits after the oracle's 12 classes, initialised as the swap initialises a new class
    # (xavier, bias 0): the attack then teaches them from the same 5 shots the other models get
    model.head = extend_head(model.head, len(FORGET), trainable=True)
    digit_ids = {d: len(names) + i for i, d in enumerate(FORGET)}

    def load(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = image_folder(roots["mnist"], split, ctx.data_config)
        images, labels = zip(*DataLoader(data, batch_size=500), strict=True)
        return torch.cat(images), torch.cat(labels)

    mnist = {split: load(split) for split in ("train", "val")}
    is_forget = {split: torch.isin(y, torch.tensor([int(d) for d in FORGET])) for split, (_, y) in mnist.items()}
    joint = {split: torch.where(is_forget[split], y.clamp(max=1) + len(names), y) for split, (_, y) in mnist.items()}
    forget_x, forget_y = mnist["val"][0][is_forget["val"]], joint["val"][is_forget["val"]]
    shots = few_shot_indices(joint["train"].tolist(), digit_ids.values(), 5)

    def features(m: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = mnist["val" if split == "test" else "train"][0]
        f = torch.cat([m.forward_head(m.forward_features(b), pre_logits=True) for b in x.split(500)])
        return f, joint["val" if split == "test" else "train"]

    host = AuditHost(
        features=features,
        forget_score=lambda m: 100.0 * float((m(forget_x).argmax(-1) == forget_y).float().mean()),
        attack_batches=[(mnist["train"][0][shots], joint["train"][shots])],
        batch_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
    )
    audit = run_audit({"oracle": model}, host, list(digit_ids.values()),
                      AuditSettings(relearn_steps=steps, relearn_lr=lr))
    return audit["oracle"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "swap_audit.json"))
    parser.add_argument("--relearn-steps", type=int, default=50)
    parser.add_argument("--relearn-lr", type=float, default=1e-4)
    args = parser.parse_args()
    attack = ["--swap-audit-relearn-steps", str(args.relearn_steps), "--swap-audit-relearn-lr", str(args.relearn_lr)]
    roots = prepare(per_class_train=1000, per_class_val=300)
    ckpt = pretrained_checkpoint(roots["mnist"])
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in AUDITED:
            print(f"running {name} ...", flush=True)
            result = audited_swap(name, roots, ckpt, Path(tmp), attack)
            rows.setdefault("pretrained", result["pretrained"])
            rows[name] = result["swapped"]
        print("running oracle ...", flush=True)
        rows["oracle (R∪L from scratch)"] = audited_oracle(roots, Path(tmp), args.relearn_steps, args.relearn_lr)
    header = f"{'model':<28}{'forget ↓':>10}{'probe F/R':>11}{'relearn F':>11}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<28}" + "".join(f"{row[c]:>11.2f}" if i else f"{row[c]:>10.2f}"
                                             for i, c in enumerate(COLUMNS)))
    lines.append(f"relearn attack: 5 images per forgotten digit, {args.relearn_steps} AdamW steps at lr "
                 f"{args.relearn_lr:g} on every weight; probe: balanced accuracy, forgotten vs retained digits")
    print("\n".join(lines))
    command = "python bench/swap_audit.py " + " ".join(sys.argv[1:])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"command": command.strip(), "rows": rows, "table": lines}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
