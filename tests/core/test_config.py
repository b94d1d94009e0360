import dataclasses
from pathlib import Path

import pytest

from kswap import (
    PRESETS,
    ForgetLoss,
    LabelSpace,
    LearnLoss,
    LoraSettings,
    LossWeights,
    Order,
    PhaseLength,
    SwapConfig,
    SwapConfigError,
    SwapRound,
    config_fields,
    config_from_fields,
    earlier_round_sets,
    plan_phases,
)
from kswap.config import vocabulary_table

DIGITS = [str(i) for i in range(10)]


def test_presets_reproduce_reference_defaults():
    cls = SwapConfig.preset("classification", forget=[0], learn=["x"])
    assert (cls.learn_loss.retain_weight, cls.learn_loss.learn_weight, cls.learn_loss.alpha) == (0.2, 1.0, 0.005)
    assert (cls.forget_loss.beta, cls.forget_loss.bnd, cls.forget_loss.alpha) == (0.2, 105.0, 0.005)
    assert cls.learn_length == PhaseLength(epochs=5) and not cls.reset_optimizer_between_phases
    det = SwapConfig.preset("detection", forget=[0], learn=["x"])
    assert (det.learn_loss.retain_weight, det.learn_loss.learn_weight) == (1.0, 0.9)
    assert (det.forget_loss.beta, det.forget_loss.bnd, det.forget_loss.alpha) == (0.2, 15.0, 0.01)
    assert det.forget_length == PhaseLength(epochs=20)
    seg = SwapConfig.preset("segmentation", forget=[0], learn=["x"])
    assert (seg.forget_loss.bnd, seg.learn_loss.learn_weight) == (115.0, 0.9)
    assert seg.learn_length == PhaseLength(steps=3500) and seg.reset_optimizer_between_phases
    assert all(p["lora"].rank == 8 and p["lora"].scaling == 0.125 for p in PRESETS.values())
    assert cls.order is Order.LEARN_THEN_FORGET and cls.forget_retains_learned


def test_dict_round_trip_and_fingerprint():
    cfg = SwapConfig.preset("detection", forget=["cat"], learn=["zebra"], order="forget_then_learn",
                            learn_length="300steps")
    again = SwapConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    other = SwapConfig.from_dict({**cfg.to_dict(), "forget_loss": {**cfg.to_dict()["forget_loss"], "bnd": 20.0}})
    assert other.fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize("text, expected", [
    ("500steps", PhaseLength(steps=500)), ("5epochs", PhaseLength(epochs=5)), ("1 step", PhaseLength(steps=1)),
    (3, PhaseLength(epochs=3)), ({"steps": 7}, PhaseLength(steps=7)),
])
def test_phase_length_parse(text, expected):
    assert PhaseLength.parse(text) == expected


def test_joint_loss_combines_phase_weights():
    cfg = SwapConfig.preset("segmentation", forget=[0], learn=["x"], order="joint")
    assert cfg.joint_loss == LossWeights(retain_weight=1.0, learn_weight=0.9, beta=0.2, bnd=115.0, alpha=0.01)


@pytest.mark.parametrize("field", [f for f in config_fields() if f.path[0] in ("learn_loss", "forget_loss")],
                         ids=lambda f: f.name)
def test_every_loss_setting_reaches_a_phase(field):
    """No loss setting is inert: changing it changes the weights of some phase of some order."""
    def phase_weights(config: SwapConfig) -> list[LossWeights]:
        return [p.loss for order in Order for p in plan_phases(dataclasses.replace(config, order=order))]

    base = SwapConfig.preset("classification", forget=[0], learn=["x"])
    value = field.get(base)
    changed = (not value) if isinstance(value, bool) else value * 2 + 1
    other = SwapConfig.preset("classification", forget=[0], learn=["x"], **{field.path[0]: {field.path[1]: changed}})
    assert phase_weights(other) != phase_weights(base)


@pytest.mark.parametrize("kwargs, message", [
    (dict(forget=[], learn=["x"]), "forget set is empty"),
    (dict(forget=[1], learn=[]), "learn set is empty"),
    (dict(forget=[1], learn=["x"], retain=[]), "retain set is empty"),
    (dict(forget=[1, 1], learn=["x"]), "more than once"),
    (dict(forget=[1.5], learn=["x"]), "class names or integer ids"),
    (dict(forget=[1], learn=["x"], order="sideways"), "Unknown order"),
    (dict(forget=[1], learn=["x"], forget_loss=ForgetLoss(bnd=0)), "bnd must be > 0"),
    (dict(forget=[1], learn=["x"], forget_loss=ForgetLoss(beta=-1)), "beta must be >= 0"),
    (dict(forget=[1], learn=["x"], forget_loss=ForgetLoss(beta=50)), "beta=50 is out of range"),
    (dict(forget=[1], learn=["x"], learn_loss=LearnLoss(alpha=-0.1)), "alpha must be >= 0"),
    (dict(forget=[1], learn=["x"], learn_loss=LearnLoss(alpha=11)), "alpha=11 is out of range"),
    (dict(forget=[1], learn=["x"], learn_loss=LearnLoss(learn_weight=-1)), "learn_weight must be >= 0"),
    (dict(forget=[1], learn=["x"], lora=LoraSettings(rank=0)), "rank must be a positive integer"),
    (dict(forget=[1], learn=["x"], lora=LoraSettings(scaling=0)), "scaling must be > 0"),
    (dict(forget=[1], learn=["x"], lora=LoraSettings(dropout=1.0)), "dropout must be in"),
    (dict(forget=[1], learn=["x"], lora=LoraSettings(targets="")), "targets is empty"),
    (dict(forget=[1], learn=["x"], learn_length="5 fortnights"), "Cannot read phase length"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(SwapConfigError, match=message):
        SwapConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(), dict(steps=3, epochs=2), dict(epochs=-1)])
def test_phase_length_errors(kwargs):
    with pytest.raises(SwapConfigError, match="PhaseLength"):
        PhaseLength(**kwargs)


def test_unknown_preset_and_keys():
    with pytest.raises(SwapConfigError, match="Unknown task preset"):
        SwapConfig.preset("captioning", forget=[0], learn=["x"])
    with pytest.raises(SwapConfigError, match=r"Unknown swap config keys \['bogus'\]"):
        SwapConfig.from_dict({"forget": [0], "learn": ["x"], "bogus": 1})


def test_label_space_resolves_names_and_ids():
    cfg = SwapConfig(forget=["0", 1], learn=["trouser", "bag"])
    space = LabelSpace.for_config(DIGITS, cfg)
    sets = space.resolve(cfg)
    assert sets.forget == (0, 1) and sets.retain == tuple(range(2, 10)) and sets.learn == (10, 11)
    assert space.num_classes == 12 and space.id_of("bag") == 11 and space.names[10] == "trouser"
    explicit = SwapConfig(forget=[0], retain=["5", "6"], learn=["trouser"])
    assert LabelSpace.for_config(DIGITS, explicit).resolve(explicit).retain == (5, 6)


ROUNDS = [SwapRound(1, ("0", "1"), ("trouser", "bag")), SwapRound(2, ("2",), ("sneaker",))]
SWAPPED = [*DIGITS, "trouser", "bag", "sneaker"]  # the head of round 2's model_swapped.pth


def test_a_next_round_keeps_earlier_forgotten_classes_forgotten():
    cfg = SwapConfig(forget=["3"], learn=["ankle-boot"])
    space = LabelSpace.for_config(SWAPPED, cfg, ROUNDS)
    sets = space.resolve(cfg)
    assert space.forgotten == ("0", "1", "2") and sets.kept_forgotten == (0, 1, 2)
    assert sets.forget == (3,) and sets.learn == (13,)
    assert sets.retain == (*range(4, 10), 10, 11, 12)  # the classes learned earlier are retained, 0-2 are not
    # The user asks: a retain set naming a forgotten class learns it again.
    back = SwapConfig(forget=["3"], retain=["1", "4"], learn=["ankle-boot"])
    assert LabelSpace.for_config(SWAPPED, back, ROUNDS).resolve(back).kept_forgotten == (0, 2)
    again = SwapConfig(forget=["3"], learn=["1"])
    with pytest.raises(SwapConfigError, match=r"earlier round forgot \['1'\]: retaining them learns them again"):
        LabelSpace.for_config(SWAPPED, again, ROUNDS)


def test_earlier_round_sets_name_each_rounds_forget_and_learn_sets():
    assert earlier_round_sets(ROUNDS) == {"forget_r1": ("0", "1"), "learn_r1": ("trouser", "bag"),
                                          "forget_r2": ("2",), "learn_r2": ("sneaker",)}
    # a class learned in round 1 and forgotten in round 3 is round 3's, no longer round 1's learn set
    later = [*ROUNDS, SwapRound(3, ("bag",), ())]
    assert earlier_round_sets(later)["learn_r1"] == ("trouser",) and earlier_round_sets(later)["forget_r3"] == ("bag",)


@pytest.mark.parametrize("cfg, pretrained, message", [
    (dict(forget=["eleven"], learn=["x"]), DIGITS, r"forget set names \['eleven'\].*does not know"),
    (dict(forget=[42], learn=["x"]), DIGITS, r"forget set names \[42\]"),
    (dict(forget=[0], retain=["3", "nope"], learn=["x"]), DIGITS, r"retain set names \['nope'\]"),
    (dict(forget=[0, 1], retain=[1, 2], learn=["x"]), DIGITS, r"\['1'\] are in both the forget and the retain"),
    (dict(forget=[0], learn=["7"]), DIGITS, r"classes to learn \['7'\] already exist"),
    (dict(forget=[0], learn=[3]), DIGITS, "must name its classes"),
    (dict(forget=[0, 1], learn=["x"]), ["0", "1"], "retain set is empty"),
    (dict(forget=[0], learn=["x"]), ["a", "a"], "repeat"),
])
def test_label_space_errors(cfg, pretrained, message):
    config = SwapConfig(**cfg)
    with pytest.raises(SwapConfigError, match=message):
        LabelSpace.for_config(pretrained, config).resolve(config)


def test_config_fields_name_every_setting_once_per_host():
    fields = config_fields()
    names = [f.name for f in fields]
    assert len(set(names)) == len(names) and "task" not in names
    by_name = {f.name: f for f in fields}
    alpha = by_name["forget_loss.alpha"]
    assert (alpha.flag, alpha.cfg_key, alpha.kind) == ("--swap-forget-loss-alpha", "FORGET_LOSS.ALPHA", "float")
    assert by_name["forget"].kind == by_name["retain"].kind == "classes"
    assert by_name["learn_length"].kind == "length" and by_name["order"].kind == "order"
    assert by_name["lora.group_by"].kind == "str" and by_name["forget_retains_learned"].kind == "bool"
    assert all(f.help for f in fields), [f.name for f in fields if not f.help]
    # Every leaf of the config is a field, and reading it back through its path gives the config's value.
    cfg = SwapConfig.preset("detection", forget=["cat"], learn=["zebra"])
    flat = {f.name: f.get(cfg) for f in fields}
    assert flat["forget_loss.bnd"] == 15.0 and flat["lora.targets"] == "mmdet_dino"
    leaves = {f"{k}.{kk}" if isinstance(v, dict) else k for k, v in cfg.to_dict().items() if k != "task"
              for kk in (v if isinstance(v, dict) else [None])}
    assert leaves == set(names)


def test_config_from_fields_changes_only_what_is_named():
    by_name = {f.name: f for f in config_fields()}
    cfg = config_from_fields("segmentation", {by_name["forget"]: ["cat"], by_name["learn"]: ["zebra"],
                                              by_name["forget_loss.beta"]: 0.5, by_name["lora.rank"]: 4})
    preset = SwapConfig.preset("segmentation", forget=["cat"], learn=["zebra"])
    assert cfg.forget_loss == dataclasses.replace(preset.forget_loss, beta=0.5)
    assert cfg.lora == dataclasses.replace(preset.lora, rank=4) and cfg.learn_loss == preset.learn_loss
    with pytest.raises(SwapConfigError, match=r"Unknown forget_loss settings \['gamma'\]"):
        SwapConfig.preset("detection", forget=["cat"], learn=["zebra"], forget_loss=dict(gamma=1.0))
    with pytest.raises(SwapConfigError, match=r"Unknown swap settings \['forget_classes'\]"):
        SwapConfig.preset("detection", forget=["cat"], learn=["zebra"], forget_classes=["cat"])


def test_settings_doc_lists_every_setting_as_the_code_names_it():
    doc = (Path(__file__).parents[2] / "docs" / "settings.md").read_text()
    table = doc.split("<!-- vocabulary table:", 1)[1].split("-->", 1)[1].split("<!-- end of vocabulary table -->")[0]
    assert table.strip() == vocabulary_table()
