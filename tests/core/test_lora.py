import math

import pytest
import torch
from torch import nn

from kswap import (
    CheckpointMismatchError,
    LoraSettings,
    LoraSnapshot,
    SwapConfigError,
    freeze_all_but_lora_,
    inject_lora,
    load_lora_model_state,
    lora_groups,
    lora_state_dict,
    matching_linears,
    merge_and_export,
    pretrained_model,
    reinit_lora_,
    to_injected_keys,
    to_plain_keys,
)

from swap_testing.models import tiny_swin, tiny_vit

MODELS = {
    "vit": (tiny_vit, (4, 1, 8, 8), ["blocks.0", "blocks.1"]),
    "swin": (tiny_swin, (2, 1, 32, 32), ["layers.0.blocks.0", "layers.0.blocks.1", "layers.1.blocks.0",
                                         "layers.1.blocks.1"]),
}


@pytest.fixture(params=sorted(MODELS))
def model_case(request):
    build, shape, groups = MODELS[request.param]
    return build(), torch.randn(shape), groups


def _perturb_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in f".{name}":
                p.normal_(0, 0.1)


@pytest.mark.parametrize("targets", ["timm_vit", "ffn", r"(.*\.)?mlp\.fc1"])
def test_inject_freeze_keeps_outputs_and_trains_only_lora(model_case, targets):
    model, x, _ = model_case
    model.eval()
    before = model(x)
    names = inject_lora(model, LoraSettings(targets=targets))
    assert names and all(n.endswith("fc1") or n.endswith("fc2") for n in names)
    if targets.endswith("fc1"):
        assert all(n.endswith("fc1") for n in names)
    n_trainable = freeze_all_but_lora_(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # B = 0 after the reference init: the injected model computes the same function.
    assert torch.allclose(model(x), before, atol=1e-6)


def test_reference_init_bounds(model_case):
    model, _, _ = model_case
    inject_lora(model, LoraSettings(rank=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert torch.count_nonzero(p) == 0
        elif "lora_A" in name:
            fan_in = p.shape[1]
            bound = math.sqrt(2 / (1 + 50)) * math.sqrt(3 / fan_in)
            assert p.abs().max() <= bound + 1e-7 and p.abs().max() > 0.5 * bound
            assert p.shape[0] == 4


def test_scaling_and_dropout_reach_peft():
    model = tiny_vit()
    inject_lora(model, LoraSettings(rank=4, scaling=0.5, dropout=0.1))
    layer = model.blocks[0].mlp.fc1
    assert layer.scaling["default"] == pytest.approx(0.5)
    assert layer.lora_dropout["default"].p == pytest.approx(0.1)


def test_merge_and_export_matches_and_is_plain(model_case):
    model, x, _ = model_case
    plain_keys = set(model.state_dict())
    inject_lora(model, LoraSettings())
    freeze_all_but_lora_(model)
    _perturb_lora(model)
    model.eval()
    expected = model(x)
    plain = merge_and_export(model).eval()
    assert set(plain.state_dict()) == plain_keys
    assert not any("lora" in n or "base_layer" in n for n, _ in plain.named_modules())
    torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-5)
    # the source model is untouched and still LoRA-adapted
    assert lora_state_dict(model) and torch.allclose(model(x), expected)


def test_exported_state_dict_loads_into_fresh_timm_model():
    model = tiny_vit()
    inject_lora(model, LoraSettings())
    _perturb_lora(model)
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    sd = merge_and_export(model).state_dict()
    fresh = tiny_vit().eval()
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)


def test_pretrained_model_drops_the_adapters_and_restores_buffers():
    model = tiny_vit().eval()
    x = torch.randn(3, 1, 8, 8)
    before = model(x)
    inject_lora(model, LoraSettings())
    _perturb_lora(model)
    assert not torch.allclose(model(x), before, atol=1e-4)
    plain = pretrained_model(model).eval()
    assert not any("lora_" in k for k in plain.state_dict())
    torch.testing.assert_close(plain(x), before)
    assert any("lora_" in k for k in model.state_dict())  # the swapping model keeps its adapters
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    inject_lora(bn, LoraSettings(targets="0"))
    saved = {k: v.clone() + 1 for k, v in bn.named_buffers()}
    restored = pretrained_model(bn, saved)
    assert all(torch.equal(b, saved[k]) for k, b in restored.named_buffers())


def test_key_map_round_trip(model_case):
    model, _, _ = model_case
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, LoraSettings())
    injected = model.state_dict()
    assert set(to_injected_keys(plain, model)) == {k for k in injected if ".lora_" not in k}
    assert set(to_plain_keys(injected, model)) == set(plain)
    round_trip = to_plain_keys(to_injected_keys(plain, model), model)
    assert round_trip.keys() == plain.keys() and all(torch.equal(round_trip[k], plain[k]) for k in plain)


def test_plain_checkpoint_loads_into_injected_model():
    source, target = tiny_vit(), tiny_vit()
    plain = source.state_dict()
    inject_lora(target, LoraSettings())
    missing = load_lora_model_state(target, plain)
    assert missing and all(".lora_" in k for k in missing)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(target.eval()(x), source.eval()(x))


def test_lora_checkpoint_loads_back_exactly():
    model = tiny_vit()
    inject_lora(model, LoraSettings())
    _perturb_lora(model)
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny_vit()
    inject_lora(other, LoraSettings())
    assert load_lora_model_state(other, ckpt) == []
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ckpt.items())


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.pop("blocks.0.norm1.weight"), r"missing \[blocks.0.norm1.weight\]"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)), r"unexpected \[extra.weight\]"),
    (lambda sd: sd.__setitem__("head.weight", torch.zeros(12, 32)), r"shape mismatch \[head.weight"),
])
def test_bad_checkpoint_is_refused(corrupt, message):
    sd = tiny_vit().state_dict()
    corrupt(sd)
    model = tiny_vit()
    inject_lora(model, LoraSettings())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=message):
        load_lora_model_state(model, sd)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_targets_matching_nothing_name_existing_layers():
    with pytest.raises(SwapConfigError, match=r"matches no linear layer.*blocks.0.attn.qkv"):
        inject_lora(tiny_vit(), LoraSettings(targets=r"decoder\.ffn\.\d+"))
    with pytest.raises(SwapConfigError, match="neither a preset"):
        inject_lora(tiny_vit(), LoraSettings(targets="blocks.(("))


def test_groups_per_block(model_case):
    model, _, groups = model_case
    inject_lora(model, LoraSettings())
    found = lora_groups(model)
    assert sorted(found) == groups
    assert all(len(params) == 4 for params in found.values())  # fc1/fc2 x A/B
    # a frozen group is skipped
    for p in found[groups[0]]:
        p.requires_grad_(False)
    assert groups[0] not in lora_groups(model)


def test_reinit_after_host_init_restores_identity():
    model = tiny_vit()
    inject_lora(model, LoraSettings())
    x = torch.randn(2, 1, 8, 8)
    expected = model.eval()(x)
    _perturb_lora(model)  # e.g. a host's init_weights re-initialising every 2-D tensor
    assert not torch.allclose(model(x), expected)
    reinit_lora_(model)
    torch.testing.assert_close(model(x), expected)


def test_matching_linears_only_linear_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Conv1d(4, 4, 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

    assert matching_linears(Net(), r"blocks\.\d+\.fc\d") == ["blocks.0.fc1", "blocks.1.fc1"]


def test_lora_snapshot_computes_with_the_saved_weights_and_restores_the_current_ones():
    model = tiny_vit().eval()
    inject_lora(model, LoraSettings())
    x = torch.randn(4, 1, 8, 8)
    _perturb_lora(model)
    snapshot = LoraSnapshot(model)
    at_snapshot = model(x)
    _perturb_lora(model)
    current = {k: v.clone() for k, v in lora_state_dict(model).items()}
    now = model(x)
    with snapshot.active(model):
        assert torch.allclose(model(x), at_snapshot)
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in current.items())
    assert torch.equal(model(x), now)
    restored = LoraSnapshot.from_state_dict(model, snapshot.state_dict())
    with restored.active(model):
        assert torch.allclose(model(x), at_snapshot)
    with pytest.raises(CheckpointMismatchError, match="lacks"):
        LoraSnapshot.from_state_dict(model, {})


def test_lora_snapshot_computes_in_eval_mode_and_restores_each_modules_mode():
    model = tiny_vit()
    model.blocks[0].mlp.drop1.p = 0.5  # a teacher's logits must not carry the student's dropout
    inject_lora(model, LoraSettings())
    x = torch.randn(4, 1, 8, 8)
    snapshot = LoraSnapshot(model)
    expected = model.eval()(x)
    model.train()
    model.head.eval()  # a module the training loop keeps in eval mode stays there
    with snapshot.active(model):
        assert not model.training
        assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    assert model.training and model.blocks[0].mlp.drop1.training and not model.head.training
    assert not torch.equal(model(x), expected)  # dropout is on again


def test_attention_preset_adds_the_projections_and_keeps_one_group_per_block():
    ffn, attn = tiny_vit(), tiny_vit()
    ffn_names = inject_lora(ffn, LoraSettings(targets="ffn"))
    attn_names = inject_lora(attn, LoraSettings(targets="timm_vit_attn"))
    assert not any(".attn." in n for n in ffn_names)   # the reference placement stays FFN-only
    assert set(attn_names) - set(ffn_names) == {f"blocks.{b}.attn.{p}" for b in (0, 1) for p in ("qkv", "proj")}
    freeze_all_but_lora_(attn)
    assert sorted(lora_groups(attn)) == ["blocks.0", "blocks.1"]
