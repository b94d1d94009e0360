"""timm_swap.train with and without ``--plugin swap``, on real handwritten digits and a tiny timm ViT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kswap import load_checkpoint
from timm_swap.train import main

TINY_VIT = ["--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=2", "embed_dim=64", "depth=2",
            "num_heads=4", "--img-size", "8", "--in-chans", "1", "--mean", "0.5", "--std", "0.5", "--crop-pct", "1.0",
            "-j", "0", "--no-progress", "--seed", "0", "--log-interval", "0"]
SWAP = ["--plugin", "swap", "--swap-forget", "0", "--swap-learn-length", "100steps", "--swap-forget-length",
        "100steps", "--swap-learn-retain-weight", "1", "--opt", "adamw", "--lr", "1e-2", "--weight-decay", "0.05",
        "--warmup-epochs", "0", "--min-lr", "1e-5", "-b", "32", "--num-classes", "8"]


@pytest.fixture(scope="module")
def pretrained(digit_folders, tmp_path_factory):
    """A tiny ViT trained on digits 0-7 by the script itself, without plugins."""
    out = tmp_path_factory.mktemp("pretrain")
    ctx = main(["--data-dir", str(digit_folders / "old"), *TINY_VIT, "--num-classes", "8", "--epochs", "30",
                "--opt", "adamw", "--lr", "3e-3", "--no-aug", "--smoothing", "0", "--warmup-epochs", "0", "-b", "64",
                "--output", str(out), "--experiment", "pre"])
    return ctx.output_dir / "last.pth"


def swap_args(digit_folders, pretrained, out, *extra):
    return ["--data-dir", str(digit_folders / "old"), "--swap-learn-dir", str(digit_folders / "new"), *TINY_VIT,
            *SWAP, "--initial-checkpoint", str(pretrained), "--output", str(out), *extra]


def test_plain_training_writes_timm_loadable_checkpoint(pretrained, digit_folders):
    import timm

    metrics = [json.loads(line) for line in (pretrained.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 30 and metrics[-1]["eval/top1"] > 85
    ckpt = load_checkpoint(pretrained)  # weights_only=True
    assert ckpt["position"] == {"period_index": 1, "epoch": 0, "step_in_epoch": 0, "global_step": metrics[-1]["step"]}
    model = timm.create_model("vit_tiny_patch16_224", patch_size=2, embed_dim=64, depth=2, num_heads=4, img_size=8,
                              in_chans=1, num_classes=8, checkpoint_path=str(pretrained))
    assert torch.equal(model.head.weight, ckpt["state_dict"]["head.weight"])
    assert (pretrained.parent / "model_best.pth").exists()


def test_swap_learns_forgets_retains_and_exports(digit_folders, pretrained, tmp_path):
    ctx = main(swap_args(digit_folders, pretrained, tmp_path, "--experiment", "swap", "--swap-eval-interval", "50"))
    out = ctx.output_dir
    report = json.loads((out / "swap_report.json").read_text())
    before, learned, after = (report["metrics"]["before"], report["metrics"]["phases"][0]["after"],
                              report["metrics"]["after"])
    table = (out / "swap_report.md").read_text()
    assert before["forget"] > 85 and before["learn"] < 10, table
    # Directions on a tiny 2-block model and 100 steps per phase; the demo (MNIST) checks the real targets.
    assert learned["learn"] > 50, table
    assert after["forget"] < 10, table
    assert after["learn"] > 40, table
    assert after["retain"] > before["retain"] - 15, table
    assert [p["step"] for p in report["curve"]] == [0, 50, 100, 150, 200]
    assert report["classes"]["learn"] == ["eight", "nine"] and (out / "swap_report.png").exists()
    # The merged export loads into plain timm in a process where kswap cannot be imported.
    code = textwrap.dedent(f"""
        import sys; sys.modules["kswap"] = None; sys.modules["timm_swap"] = None
        import timm, torch
        m = timm.create_model("vit_tiny_patch16_224", patch_size=2, embed_dim=64, depth=2, num_heads=4, img_size=8,
                              in_chans=1, num_classes=10, checkpoint_path={str(out / "model_swapped.pth")!r}).eval()
        x = torch.load({str(tmp_path / "x.pt")!r})
        torch.save(m(x), {str(tmp_path / "y.pt")!r})
    """)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", code], check=True)
    expected = ctx.model.eval()(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, atol=1e-5, rtol=1e-5)
    assert json.loads((out / "class_names.json").read_text())[8:] == ["eight", "nine"]


PLUGIN = '''
from timm_swap import hookimpl

class StopAt:
    """A third-party plugin: adds a flag and stops the run after a given step (a simulated crash)."""

    @hookimpl
    def add_arguments(self, parser):
        parser.add_argument("--stop-at", type=int, default=0)

    @hookimpl
    def after_step(self, ctx, step, losses):
        ctx.seen = getattr(ctx, "seen", []) + [(step.period, step.global_step, round(losses["loss"], 6))]
        if ctx.args.stop_at and step.global_step + 1 == ctx.args.stop_at:
            raise KeyboardInterrupt("simulated crash")
'''


@pytest.fixture
def third_party_plugin(tmp_path, monkeypatch):
    """Install a plugin the way a third party would: a module plus an entry point in its dist-info."""
    site = tmp_path / "site"
    (site / "stopat-1.0.dist-info").mkdir(parents=True)
    (site / "stopat.py").write_text(PLUGIN)
    (site / "stopat-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: stopat\nVersion: 1.0\n")
    (site / "stopat-1.0.dist-info" / "entry_points.txt").write_text("[timm_swap.plugins]\nstopat = stopat:StopAt\n")
    monkeypatch.syspath_prepend(str(site))
    return "stopat"


def test_resume_mid_phase_continues_exactly(digit_folders, pretrained, tmp_path, third_party_plugin):
    full = main(swap_args(digit_folders, pretrained, tmp_path, "--experiment", "full", "--plugin", "stopat"))
    args = swap_args(digit_folders, pretrained, tmp_path, "--experiment", "cut", "--plugin", "stopat",
                     "--recovery-interval", "10")
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--stop-at", "130"])
    last = tmp_path / "cut" / "last.pth"
    state = load_checkpoint(last)
    assert state["plugins"]["swap"]["scheduler"]["phase_index"] == 1
    assert state["plugins"]["swap"]["scheduler"]["step_in_phase"] == 20  # last recovery point: step 120
    resumed = main([*args, "--resume", str(last)])
    assert resumed.output_dir == full.output_dir.parent / "cut"
    assert resumed.seen == full.seen[120:]  # same phases, steps and losses after the cut
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "cut" / "swap_report.json").read_text())["metrics"] == \
        json.loads((tmp_path / "full" / "swap_report.json").read_text())["metrics"]


def test_unknown_plugin_lists_installed(third_party_plugin):
    with pytest.raises(SystemExit, match=r"unknown plugin 'nope'.*stopat.*swap|unknown plugin 'nope'.*swap"):
        main(["--plugin", "nope"])


def test_yaml_config_and_unknown_keys(digit_folders, pretrained, tmp_path):
    cfg = tmp_path / "swap.yaml"
    cfg.write_text("plugin: [swap]\nswap_forget: ['0']\nswap_bnd: 7.5\nbatch_size: 16\n")
    from timm_swap.train import parse_args

    args, _ = parse_args(["-c", str(cfg), "--data-dir", "x"])
    assert args.plugin == ["swap"] and args.swap_bnd == 7.5 and args.batch_size == 16
    args, _ = parse_args(["-c", str(cfg), "--swap-bnd", "9"])
    assert args.swap_bnd == 9
    cfg.write_text("plugin: [swap]\nswap_bound: 7.5\n")
    with pytest.raises(SystemExit):
        parse_args(["-c", str(cfg)])


@pytest.fixture
def learn_clash(digit_folders, tmp_path):
    """A learn folder with a class named like a pretrained one ("3")."""
    import shutil

    root = tmp_path / "clash"
    shutil.copytree(digit_folders / "new", root)
    for split in ("train", "val"):
        (root / split / "eight").rename(root / split / "3")
    return root


@pytest.mark.parametrize("case, message", [
    ("unknown_class", r"forget set names \['eleven'\]"),
    ("learn_clash", r"classes to learn \['3'\] already exist in the pretrained model"),
    ("empty_folder", r"class folders without images: \['5'\]"),
    ("head_mismatch", r"has a 8-class head .* but --num-classes is 9"),
    ("num_classes", r"--num-classes 9 is the size of the pretrained head, but --data-dir has 8 classes"),
    ("missing_learn", r"--swap-learn names \['ten'\]"),
    ("overlap", r"are in both the forget and the retain set"),
])
def test_bad_input_fails_before_training(case, message, digit_folders, pretrained, tmp_path, learn_clash):
    import shutil

    args = swap_args(digit_folders, pretrained, tmp_path / "out", "--experiment", "bad")
    if case == "unknown_class":
        args += ["--swap-forget", "eleven"]
    elif case == "learn_clash":
        args += ["--swap-learn-dir", str(learn_clash)]
    elif case == "empty_folder":
        data = tmp_path / "data"
        shutil.copytree(digit_folders / "old", data)
        for f in (data / "train" / "5").iterdir():
            f.unlink()
        args += ["--data-dir", str(data)]
    elif case == "head_mismatch":
        from timm_swap.train import create_model, parse_args

        parsed, _ = parse_args([*TINY_VIT, "--num-classes", "9", "--initial-checkpoint", str(pretrained)])
        with pytest.raises(Exception, match=message):
            create_model(parsed)
        return
    elif case == "num_classes":
        args += ["--num-classes", "9"]
    elif case == "missing_learn":
        args += ["--swap-learn", "ten"]
    elif case == "overlap":
        args += ["--swap-retain", "0", "1"]
    with pytest.raises(SystemExit, match=message):
        main(args)
    assert not (tmp_path / "out").exists()


def test_resume_with_another_config_is_refused(digit_folders, pretrained, tmp_path):
    main(swap_args(digit_folders, pretrained, tmp_path, "--experiment", "a", "--swap-learn-length", "5steps",
                   "--swap-forget-length", "5steps"))
    last = tmp_path / "a" / "last.pth"
    before = last.read_bytes()
    with pytest.raises(SystemExit, match="Cannot resume: the checkpoint was written by another swap config"):
        main(swap_args(digit_folders, pretrained, tmp_path, "--swap-learn-length", "5steps", "--swap-forget-length",
                       "5steps", "--swap-bnd", "50", "--resume", str(last)))
    assert last.read_bytes() == before


def test_wandb_offline(digit_folders, pretrained, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ctx = main(swap_args(digit_folders, pretrained, tmp_path, "--experiment", "wb", "--swap-learn-length", "4steps",
                         "--swap-forget-length", "4steps", "--log-wandb", "--log-interval", "2"))
    import wandb

    wandb.finish()
    runs = list((ctx.output_dir / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_ddp_two_processes_match_single_process(digit_folders, pretrained, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 16 each, against one process with batch 32."""
    common = swap_args(digit_folders, pretrained, tmp_path, "--swap-learn-length", "30steps",
                       "--swap-forget-length", "30steps")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         str(Path(__file__).parents[1] / "train.py"), *common, "-b", "16", "--experiment", "ddp"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = main([*common, "-b", "32", "--experiment", "single"])
    ddp_report = json.loads((tmp_path / "ddp" / "swap_report.json").read_text())["metrics"]
    one_report = json.loads((single.output_dir / "swap_report.json").read_text())["metrics"]
    assert ddp_report["before"] == one_report["before"]  # same model, same eval sets, counts summed over ranks
    for name in ("forget", "retain", "learn"):
        assert abs(ddp_report["after"][name] - one_report["after"][name]) < 15, (ddp_report, one_report)
    assert ddp_report["after"]["forget"] < 20 and ddp_report["after"]["learn"] > 30
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pth")
    assert ckpt["position"]["global_step"] == 60
