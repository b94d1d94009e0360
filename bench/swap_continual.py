"""Continual swapping on the demo: three rounds, each swapping the model the previous round wrote.

Round 1 swaps the demo's pretrained MNIST ViT (forget 0 and 1, learn trouser and bag), round 2 swaps round 1's
``model_swapped.pth`` (forget 2, learn sneaker), round 3 round 2's (forget 3, learn ankle boot), each with the demo's
config (``demo/swap.yaml``) and ``train.py``, the script users run. After each round it records every forget and
learn set so far (the report scores earlier rounds' sets as ``forget_r<k>`` / ``learn_r<k>``), the retain set (the
digits still kept) and the pretrained model's score on that same retain set, and checks the goal:

- every forget set so far <= 1 %;
- retain within 2 points of the pretrained model's score on the same digits;
- each learn set within 3 points of its score at the end of its own round.

Writes ``bench/results/swap_continual.json``. ``--smoke`` runs the same rounds on a few images per class with a few
steps per phase (it checks the plumbing, not the numbers).

Usage: ``OMP_NUM_THREADS=1 python bench/swap_continual.py [--smoke] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "demo"))

from prepare_data import prepare  # noqa: E402
from swap_mnist import pretrained_checkpoint  # noqa: E402

TRAIN = ROOT / "train.py"
RESULT = ROOT / "bench" / "results" / "swap_continual.json"
ROUNDS = [(["0", "1"], ["trouser", "bag"]), (["2"], ["sneaker"]), (["3"], ["ankle-boot"])]
GOAL = {"forget_max": 1.0, "retain_drop_max": 2.0, "learn_drop_max": 3.0}
SMOKE_FLAGS = ["--swap-learn-length", "3steps", "--swap-forget-length", "3steps", "-b", "16"]


def run_round(k: int, forget: list[str], learn: list[str], checkpoint: Path, roots: dict[str, Path], out: Path,
              extra: list[str]) -> Path:
    """Round ``k`` of the demo's swap from ``checkpoint``; returns its output folder."""
    cmd = [sys.executable, str(TRAIN), "-c", str(ROOT / "demo" / "swap.yaml"), "--data-dir", str(roots["mnist"]),
           "--swap-learn-dir", str(roots["fashion"]), "--initial-checkpoint", str(checkpoint), "--swap-forget",
           *forget, "--swap-learn", *learn, "--output", str(out), "--experiment", f"round{k}", "--no-progress",
           "--log-interval", "0", *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / f"round{k}"


def pretrained_retain(checkpoint: Path, mnist: Path, classes: list[str]) -> float:
    """Top-1 (%) of the pretrained model (plain timm, demo/pretrain.yaml's model) on the val images of ``classes``:
    the retain score a swap keeps within reach of."""
    import timm
    import torch
    import yaml
    from timm.data import resolve_data_config

    from timm_swap.data import folder_classes, image_folder
    from timm_swap.evaluation import evaluate_top1

    cfg = yaml.safe_load((ROOT / "demo" / "pretrain.yaml").read_text())
    model = timm.create_model(cfg["model"], num_classes=cfg["num_classes"], img_size=cfg["img_size"],
                              in_chans=cfg["in_chans"], checkpoint_path=str(checkpoint), **cfg["model_kwargs"])
    data_config = resolve_data_config({"input_size": (cfg["in_chans"], cfg["img_size"], cfg["img_size"]),
                                       "mean": cfg["mean"], "std": cfg["std"], "crop_pct": cfg["crop_pct"]},
                                      model=model)
    ids = {name: i for i, name in enumerate(folder_classes(mnist, "train"))}
    dataset = image_folder(mnist, "val", data_config, {c: ids[c] for c in classes})
    return evaluate_top1(model.eval(), torch.utils.data.DataLoader(dataset, batch_size=256), torch.device("cpu"))


def round_row(k: int, report: dict[str, Any], own_end: dict[int, float], retain_pretrained: float) -> dict[str, Any]:
    """Round ``k``'s scores: every forget and learn set so far by round, retain against the pretrained model."""
    after = report["metrics"]["after"]
    forget = {k: after["forget"], **{j: after[f"forget_r{j}"] for j in range(1, k) if f"forget_r{j}" in after}}
    learn = {k: after["learn"], **{j: after[f"learn_r{j}"] for j in range(1, k) if f"learn_r{j}" in after}}
    own_end[k] = after["learn"]
    goal = {
        "forget": all(v <= GOAL["forget_max"] for v in forget.values()),
        "retain": retain_pretrained - after["retain"] <= GOAL["retain_drop_max"],
        "learn": all(own_end[j] - v <= GOAL["learn_drop_max"] for j, v in learn.items()),
    }
    return {"round": k, "forget": dict(sorted(forget.items())), "retain": after["retain"],
            "retain_pretrained": retain_pretrained, "learn": dict(sorted(learn.items())),
            "learn_at_own_round_end": {j: own_end[j] for j in sorted(learn)}, "goal": goal,
            "classes": report["classes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None,
                        help="the JSON (default: bench/results/swap_continual.json; with --smoke, in --work)")
    parser.add_argument("--work", default=None, help="where the rounds' outputs go (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a few images and steps: the plumbing, not the numbers")
    args = parser.parse_args()
    roots = prepare(per_class_train=40, per_class_val=20) if args.smoke else prepare(1000, 300)
    extra = SMOKE_FLAGS if args.smoke else []
    work = Path(args.work or os.environ.get("TMPDIR", "/tmp")) / f"swap_continual-{time.strftime('%Y%m%d-%H%M%S')}"
    pretrained = pretrained_checkpoint(roots["mnist"])
    checkpoint, rows, own_end = pretrained, [], {}
    start = time.perf_counter()
    for k, (forget, learn) in enumerate(ROUNDS, start=1):
        out = run_round(k, forget, learn, checkpoint, roots, work, extra)
        report = json.loads((out / "swap_report.json").read_text())
        digits = {p.name for p in (roots["mnist"] / "train").iterdir()}
        kept = [c for c in report["classes"]["retain"] if c in digits]  # not the classes learned in earlier rounds
        rows.append(round_row(k, report, own_end, pretrained_retain(pretrained, roots["mnist"], kept)))
        print(json.dumps({key: rows[-1][key] for key in ("round", "forget", "retain", "retain_pretrained", "learn",
                                                          "goal")}), flush=True)
        checkpoint = out / "model_swapped.pth"
    result = {
        "command": "python bench/swap_continual.py" + (" --smoke" if args.smoke else ""),
        "threads": os.environ.get("OMP_NUM_THREADS"),
        "goal": GOAL,
        "rounds": rows,
        "goal_met": all(all(r["goal"].values()) for r in rows),
        "wall_s": time.perf_counter() - start,
    }
    path = Path(args.out or (work / "swap_continual.json" if args.smoke else RESULT))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"goal met at every round: {result['goal_met']}; {path}")


if __name__ == "__main__":
    main()
