import pytest
from torch import nn

from kswap import LoraSettings, discover_groups, inject_lora, lora_groups

CASES = {
    "vit": (
        [f"blocks.{i}.mlp.fc{j}" for i in range(3) for j in (1, 2)],
        {f"blocks.{i}": 2 for i in range(3)},
    ),
    "swin": (
        [f"layers.{s}.blocks.{b}.mlp.fc{j}" for s, depth in enumerate([2, 2, 6, 2]) for b in range(depth)
         for j in (1, 2)],
        {f"layers.{s}.blocks.{b}": 2 for s, depth in enumerate([2, 2, 6, 2]) for b in range(depth)},
    ),
    # mmdet DINO: mmcv FFN numbers its own linears (layers.0.0 = fc1, layers.1 = fc2); encoder and decoder apart.
    "mmdet_dino": (
        [f"{part}.layers.{i}.ffn.layers.{fc}" for part in ("encoder", "decoder") for i in range(6)
         for fc in ("0.0", "1")],
        {f"{part}.layers.{i}": 2 for part in ("encoder", "decoder") for i in range(6)},
    ),
    # Mask2Former: Swin blocks + pixel-decoder layers + transformer-decoder FFN layers (24 + 6 + 9 = 39).
    "mask2former": (
        [f"backbone.layers.{s}.blocks.{b}.mlp.fc{j}" for s, depth in enumerate([2, 2, 18, 2]) for b in range(depth)
         for j in (1, 2)]
        + [f"sem_seg_head.pixel_decoder.transformer.encoder.layers.{i}.linear{j}" for i in range(6) for j in (1, 2)]
        + [f"sem_seg_head.predictor.transformer_ffn_layers.{i}.linear{j}" for i in range(9) for j in (1, 2)],
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_discover_one_group_per_block(case):
    names, expected = CASES[case]
    groups = discover_groups(names)
    assert sorted(m for ms in groups.values() for m in ms) == sorted(names)
    if expected is not None:
        assert {k: len(v) for k, v in groups.items()} == expected
    else:
        assert len(groups) == 39
        assert "sem_seg_head.predictor.transformer_ffn_layers.8" in groups
        assert "backbone.layers.2.blocks.17" in groups


def test_single_target_per_block_still_groups_by_block():
    names = [f"encoder.layers.{i}.ffn.layers.0.0" for i in range(3)]
    assert sorted(discover_groups(names)) == [f"encoder.layers.{i}" for i in range(3)]


def test_single_block_and_unnumbered_fallbacks():
    assert discover_groups(["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]) == {"blocks.0": ["blocks.0.mlp.fc1",
                                                                                        "blocks.0.mlp.fc2"]}
    assert discover_groups(["head"]) == {"head": ["head"]}


def test_group_by_regex_overrides():
    names = CASES["swin"][0]
    groups = discover_groups(names, group_by=r"layers\.\d+")
    assert sorted(groups) == [f"layers.{s}" for s in range(4)]
    assert len(groups["layers.2"]) == 12


def test_groups_on_a_real_module_tree_shaped_like_mmcv_ffn():
    class FFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 8))

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = FFN()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer() for _ in range(3)])

    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = Encoder(), Encoder()

    model = Detector()
    inject_lora(model, LoraSettings(targets="mmdet_dino"))
    groups = lora_groups(model)
    assert sorted(groups) == sorted(f"{p}.layers.{i}" for p in ("encoder", "decoder") for i in range(3))
    assert all(len(v) == 4 for v in groups.values())
