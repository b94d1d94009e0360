import pytest

from kswap import PhaseKind, PhaseLength, PhaseScheduler, SwapConfig, SwapConfigError, plan_phases


def _cfg(order, **kw):
    return SwapConfig.preset("classification", forget=[0], learn=["x"], order=order, **kw)


@pytest.mark.parametrize("order, kinds, retain_sources", [
    ("learn_then_forget", ["learn", "forget"], [("retain",), ("retain", "learn")]),
    ("forget_then_learn", ["forget", "learn"], [("retain",), ("retain",)]),
    ("learn_forget_learn", ["learn", "forget", "learn"], [("retain",), ("retain", "learn"), ("retain",)]),
    ("forget_learn_forget", ["forget", "learn", "forget"], [("retain",), ("retain",), ("retain", "learn")]),
    ("joint", ["joint"], [("retain",)]),
])
def test_plan_follows_reference_orders(order, kinds, retain_sources):
    phases = plan_phases(_cfg(order))
    assert [p.kind.value for p in phases] == kinds
    assert [p.sources["retain"] for p in phases] == retain_sources
    for p in phases:
        expected_roles = {"learn": {"retain", "learn"}, "forget": {"retain", "forget"},
                          "joint": {"retain", "learn", "forget"}}[p.kind.value]
        assert set(p.roles) == expected_roles


def test_forget_phase_can_retain_r_only():
    phases = plan_phases(_cfg("learn_then_forget", forget_retains_learned=False))
    assert phases[1].sources["retain"] == ("retain",)


def test_phase_loss_weights_come_from_config():
    cfg = _cfg("learn_then_forget")
    learn, forget = plan_phases(cfg)
    assert learn.loss == cfg.learn_loss.weights() and forget.loss == cfg.forget_loss.weights()
    assert learn.loss.beta == 0 and forget.loss.learn_weight == 0  # a learn phase has no forget batch, and vice versa
    joint, = plan_phases(_cfg("joint"))
    assert joint.loss.learn_weight == cfg.learn_loss.learn_weight and joint.loss.bnd == cfg.forget_loss.bnd


def test_scheduler_walks_steps_and_epochs():
    cfg = _cfg("learn_then_forget", learn_length="3steps", forget_length="2epochs")
    sched = PhaseScheduler(plan_phases(cfg), steps_per_epoch=lambda p: 4 if "learn" in p.sources["retain"] else 9)
    assert sched.phase_steps == [3, 8] and sched.total_steps == 11
    kinds, ends = [], []
    while not sched.done:
        kinds.append(sched.phase.kind)
        ends.append(sched.step())
    assert kinds == [PhaseKind.LEARN] * 3 + [PhaseKind.FORGET] * 8
    assert [i for i, e in enumerate(ends) if e] == [2, 10]
    with pytest.raises(IndexError):
        sched.step()


def test_scheduler_resumes_mid_phase_exactly():
    cfg = _cfg("forget_learn_forget", learn_length="4steps", forget_length="5steps")
    first = PhaseScheduler(plan_phases(cfg), fingerprint=cfg.fingerprint())
    for _ in range(7):
        first.step()
    state = first.state_dict()
    assert (state["phase_index"], state["step_in_phase"]) == (1, 2)

    resumed = PhaseScheduler(plan_phases(cfg), fingerprint=cfg.fingerprint())
    resumed.load_state_dict(state)
    assert (resumed.phase.index, resumed.step_in_phase, resumed.global_step) == (1, 2, 7)
    trace_a, trace_b = [], []
    for sched, trace in ((first, trace_a), (resumed, trace_b)):
        while not sched.done:
            trace.append((sched.phase.name, sched.step_in_phase, sched.step()))
    assert trace_a == trace_b and len(trace_a) == 14 - 7


def test_scheduler_refuses_other_config_or_lengths():
    cfg = _cfg("learn_then_forget", learn_length="4steps", forget_length="5steps")
    state = PhaseScheduler(plan_phases(cfg), fingerprint=cfg.fingerprint()).state_dict()
    other = _cfg("forget_then_learn", learn_length="4steps", forget_length="5steps")
    with pytest.raises(SwapConfigError, match="another swap config"):
        PhaseScheduler(plan_phases(other), fingerprint=other.fingerprint()).load_state_dict(state)
    epochs = _cfg("learn_then_forget", learn_length="1epochs", forget_length="5steps")
    sched = PhaseScheduler(plan_phases(epochs), steps_per_epoch=lambda p: 6, fingerprint=cfg.fingerprint())
    with pytest.raises(SwapConfigError, match="phase lengths changed"):
        sched.load_state_dict({**state, "plan": [p.name for p in sched.phases]})


def test_scheduler_errors():
    epochs = _cfg("learn_then_forget")
    with pytest.raises(SwapConfigError, match="give steps_per_epoch"):
        PhaseScheduler(plan_phases(epochs))
    with pytest.raises(SwapConfigError, match="empty retain-side loader"):
        PhaseScheduler(plan_phases(epochs), steps_per_epoch=lambda p: 0)
    with pytest.raises(SwapConfigError, match="at least one phase"):
        PhaseScheduler([])
    assert PhaseLength(steps=2) == plan_phases(_cfg("joint", forget_length="2steps"))[0].length
