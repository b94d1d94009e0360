"""timm's own args.yaml (tests/data/timm_args.yaml, written by timm's train.py) drives timm_swap.train: every key is
accepted, the ones that matter are honoured, the others listed as ignored or refused. Real digits, a tiny timm ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from timm_swap.hookspecs import hookimpl
from timm_swap.timm_args import TIMM_KEYS, markdown_table
from timm_swap.train import main, parse_args, run

FIXTURE = Path(__file__).parent / "data" / "timm_args.yaml"
TIMM_DOC = Path(__file__).parents[2] / "docs" / "timm.md"
SWAP = ["--plugin", "swap", "--swap-forget", "0", "--swap-learn-length", "3steps", "--swap-forget-length", "3steps"]


def user_config(tmp_path: Path, data_dir: Path, name: str, **edits) -> Path:
    """The fixture as a user adapts it: paths, a tiny model for 8x8 grey digits, CPU, a short run; plus ``edits``."""
    cfg = yaml.safe_load(FIXTURE.read_text())
    cfg.update(data_dir=str(data_dir), model_kwargs={"patch_size": 2, "embed_dim": 64, "depth": 2, "num_heads": 4},
               img_size=8, in_chans=1, mean=[0.5], std=[0.5], crop_pct=1.0, num_classes=8, device="cpu", workers=0,
               batch_size=32, output=str(tmp_path), experiment=name, log_interval=0, seed=0)
    cfg.update(edits)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, default_flow_style=False))
    return path


@pytest.fixture(scope="module")
def plain_run(digit_folders, tmp_path_factory):
    """Plain training (no plugin) from timm's args.yaml, with timm's augmentation keys and two ignored keys set."""
    out = tmp_path_factory.mktemp("plain")
    cfg = user_config(out, digit_folders / "old", "plain", opt="adamw", lr=3e-3, warmup_epochs=0, epochs=7,
                      cooldown_epochs=1, val_interval=4, reprob=0.1, scale=[0.8, 1.0], ratio=[1.0, 1.0], hflip=0.0,
                      color_jitter=0.0, train_interpolation="bilinear", smoothing=0.0, model_ema=True, mixup=0.8)
    return main(["-c", str(cfg), "--no-progress"])


@pytest.fixture(scope="module")
def pretrained(plain_run) -> str:
    return str(plain_run.output_dir / "last.pth")


class Probe:
    """Records, for every loss computation, the micro-batch's rows and the autocast state it runs under."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bool, torch.dtype]] = []
        self.updates = 0

    @hookimpl
    def compute_loss(self, ctx, step):
        rows = sum(len(labels) for _, labels in step.batch.values())
        self.calls.append((rows, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    @hookimpl
    def after_step(self, ctx, step, losses):
        self.updates += 1


def run_probed(argv: list[str]) -> tuple[object, Probe]:
    args, pm = parse_args(argv)
    probe = Probe()
    pm.register(probe)
    return run(args, pm), probe


def test_every_timm_key_is_a_flag_with_timms_default():
    """Each key of timm's args.yaml is a flag here, at timm's default (but 2 workers, and the CPU without CUDA)."""
    written = yaml.safe_load(FIXTURE.read_text())
    args, _ = parse_args([])
    differ = {k for k in written if getattr(args, k) != written[k]}
    on_cpu = set() if torch.cuda.is_available() else {"device"}
    assert differ == {"data_dir", "model", "num_classes", "workers"} | on_cpu
    args, _ = parse_args(["--amp", "--amp-dtype", "bfloat16", "--grad-accum-steps", "4", "--torchcompile",
                          "--opt-kwargs", "nesterov=true", "--local_rank", "1", "--train-steps-per-epoch", "7",
                          "--naflex-train-seq-lens", "64", "128", "--mixup-mode", "pair"])
    assert (args.amp, args.amp_dtype, args.grad_accum_steps, args.torchcompile) == (True, "bfloat16", 4, "inductor")
    assert args.opt_kwargs == {"nesterov": True} and args.local_rank == 1 and args.train_batches_per_epoch == 7
    assert args.naflex_train_seq_lens == [64, 128]
    assert {k.name for k in TIMM_KEYS} <= set(written)


def test_timm_doc_lists_every_key_rule():
    assert markdown_table() in TIMM_DOC.read_text()


def test_plain_training_from_timm_args_yaml(plain_run):
    """Without a plugin the same file trains like timm's train.py: its transform keys build the train transform,
    --epochs 7 --cooldown-epochs 1 train 8 epochs, --val-interval 4 evaluates every fourth epoch, and the ignored
    keys are reset to timm's defaults."""
    out = plain_run.output_dir
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_per_epoch = len(plain_run.loaders["train"])
    assert [m["step"] for m in metrics] == [4 * steps_per_epoch, 8 * steps_per_epoch]
    assert metrics[-1]["eval/top1"] > 35  # 8 classes: chance is 12.5
    transform = repr(plain_run.loaders["train"].dataset.transform)
    assert "RandomErasing(p=0.1" in transform and "interpolation=bilinear" in transform
    assert yaml.safe_load((out / "args.yaml").read_text())["model_ema"] is False  # reset: what the run used


def test_plain_training_names_ignored_keys(digit_folders, tmp_path, capsys):
    """Plain training lists what it ignores; it honours timm's auto-augment and class map keys."""
    class_map = tmp_path / "class_map.txt"
    class_map.write_text("\n".join(str(d) for d in reversed(range(8))))
    cfg = user_config(tmp_path, digit_folders / "old", "ignored", epochs=1, model_ema=True, kd_model_name="resnet18",
                      aa="rand-m3-n1", class_map=str(class_map))
    ctx = main(["-c", str(cfg), "--no-progress", "--train-split", "val"])
    out = capsys.readouterr().out
    assert "RandAugment" in repr(ctx.loaders["train"].dataset.transform)
    assert ctx.loaders["train"].dataset.reader.class_to_idx == {str(d): 7 - d for d in range(8)}
    assert out.count("model_ema: True -> False: no EMA copy") == 1
    assert out.count("kd_model_name: 'resnet18' -> None: knowledge distillation is not implemented") == 1
    assert "timm keys this script ignores are at timm's defaults" in out


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true but no accelerator")
def test_swap_from_timm_args_yaml(digit_folders, pretrained, tmp_path, capsys):
    """A swap runs from timm's args.yaml of the pretraining run; layer decay, channels_last and pin memory apply,
    the keys the swap ignores (mixup, EMA, timm's augmentation) are listed once with the reason."""
    cfg = user_config(tmp_path, digit_folders / "old", "swap", initial_checkpoint=pretrained, layer_decay=0.65,
                      channels_last=True, pin_mem=True, mixup=0.8, model_ema=True, aa="rand-m3-n1")
    ctx = main(["-c", str(cfg), "--no-progress", "--swap-learn-dir", str(digit_folders / "new"), *SWAP])
    out = capsys.readouterr().out
    assert out.count("mixup: 0.8 -> 0.0: the swap's losses need each image's own set") == 1
    assert out.count("model_ema: True -> False: no EMA copy") == 1
    assert out.count("aa: 'rand-m3-n1' -> None: the swap trains on the eval transform") == 1
    report = json.loads((ctx.output_dir / "swap_report.json").read_text())
    assert set(report["metrics"]["after"]) == {"forget", "retain", "learn"}
    assert report["classes"]["learn"] == ["eight", "nine"]
    assert (ctx.output_dir / "model_swapped.pth").exists()
    assert len({group["lr_scale"] for group in ctx.optimizer.param_groups}) > 1  # layer-wise LR decay on LoRA
    assert ctx.model.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert ctx.loaders["swap/retain"].pin_memory


def test_grad_accumulation_equals_the_full_batch_update(digit_folders, pretrained, tmp_path):
    """-b 16 with --grad-accum-steps 2 is one update per step over two 16-row micro-batches, and ends at the
    weights of -b 32 without accumulation (same data order, the loss averaged over the micro-batches)."""
    full_cfg = user_config(tmp_path, digit_folders / "old", "full", initial_checkpoint=pretrained)
    accum_cfg = user_config(tmp_path, digit_folders / "old", "accum", initial_checkpoint=pretrained, batch_size=16,
                            grad_accum_steps=2)
    # SGD: unlike Adam, its update scales with the gradient, so a wrong loss scaling would show.
    learn = ["--no-progress", "--swap-learn-dir", str(digit_folders / "new"), *SWAP, "--swap-opt", "sgd", "--swap-lr",
             "0.1"]
    full, full_probe = run_probed(["-c", str(full_cfg), *learn])
    accum, accum_probe = run_probed(["-c", str(accum_cfg), *learn])
    assert full_probe.updates == accum_probe.updates == 6
    assert [rows for rows, _, _ in full_probe.calls] == [64] * 6  # retain-side and target batches of 32
    assert [rows for rows, _, _ in accum_probe.calls] == [32] * 12
    assert not any(amp for _, amp, _ in accum_probe.calls)
    full_state = full.model.state_dict()
    for key, value in accum.model.state_dict().items():
        torch.testing.assert_close(value, full_state[key], rtol=1e-4, atol=1e-5, msg=key)


def test_amp_bfloat16_autocasts_the_loss(digit_folders, pretrained, tmp_path):
    cfg = user_config(tmp_path, digit_folders / "old", "amp", initial_checkpoint=pretrained, amp=True,
                      amp_dtype="bfloat16")
    _, probe = run_probed(["-c", str(cfg), "--no-progress", "--swap-learn-dir", str(digit_folders / "new"), *SWAP])
    assert probe.calls and all(amp and dtype == torch.bfloat16 for _, amp, dtype in probe.calls)


@pytest.mark.parametrize("edits, plugin, named", [
    ({"bce_loss": True}, True, "--bce-loss True (key 'bce_loss'): the loss is cross-entropy"),
    ({"aug_splits": 3}, False, "--aug-splits 3 (key 'aug_splits'): augmentation splits are not implemented"),
    ({"class_map": "map.txt"}, True, "--class-map 'map.txt' (key 'class_map'): the swap numbers"),
    ({"naflex_loader": True, "dataset": "torch/cifar10"}, True, "--naflex-loader True"),
])
def test_refused_key_stops_before_training(edits, plugin, named, digit_folders, tmp_path):
    cfg = user_config(tmp_path, digit_folders / "old", "refused", initial_checkpoint="unused.pth", **edits)
    swap = [*SWAP, "--swap-learn-dir", str(digit_folders / "new")] if plugin else []
    with pytest.raises(SystemExit) as err:
        main(["-c", str(cfg), *swap])
    assert named in str(err.value)
    if "dataset" in edits:
        assert "--dataset 'torch/cifar10' (key 'dataset')" in str(err.value)
    assert not (tmp_path / "refused").exists()
