"""The phase plan of a swap and a resumable scheduler that walks it step by step."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import LossWeights, Order, PhaseLength, SwapConfig
from .errors import SwapConfigError


class PhaseKind(str, Enum):
    LEARN = "learn"
    FORGET = "forget"
    JOINT = "joint"


_ORDERS: dict[Order, tuple[PhaseKind, ...]] = {
    Order.LEARN_THEN_FORGET: (PhaseKind.LEARN, PhaseKind.FORGET),
    Order.FORGET_THEN_LEARN: (PhaseKind.FORGET, PhaseKind.LEARN),
    Order.LEARN_FORGET_LEARN: (PhaseKind.LEARN, PhaseKind.FORGET, PhaseKind.LEARN),
    Order.FORGET_LEARN_FORGET: (PhaseKind.FORGET, PhaseKind.LEARN, PhaseKind.FORGET),
    Order.JOINT: (PhaseKind.JOINT,),
}


@dataclass(frozen=True)
class Phase:
    """One phase: which data sets feed each loss role, the loss weights and the length.

    ``sources`` maps a loss role (``retain``, ``learn``, ``forget``) to the data sets concatenated into that
    role's loader, e.g. ``{"retain": ("retain", "learn"), "forget": ("forget",)}`` for the forget phase of
    learn-then-forget.
    """

    index: int
    kind: PhaseKind
    sources: Mapping[str, tuple[str, ...]]
    loss: LossWeights
    length: PhaseLength

    @property
    def name(self) -> str:
        return f"{self.index}_{self.kind.value}"

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(self.sources)


def plan_phases(config: SwapConfig) -> list[Phase]:
    """The phases of ``config.order``.

    A forget phase retains R ∪ L when a learn phase came before it and ``forget_retains_learned`` is set
    (the reference's learn-then-forget); otherwise it retains R. Learn phases retain R.
    """
    phases = []
    learned = False
    for index, kind in enumerate(_ORDERS[config.order]):
        if kind is PhaseKind.LEARN:
            sources = {"retain": ("retain",), "learn": ("learn",)}
            loss, length = config.learn_loss.weights(), config.learn_length
            learned = True
        elif kind is PhaseKind.FORGET:
            keep = ("retain", "learn") if learned and config.forget_retains_learned else ("retain",)
            sources = {"retain": keep, "forget": ("forget",)}
            loss, length = config.forget_loss.weights(), config.forget_length
        else:
            sources = {"retain": ("retain",), "learn": ("learn",), "forget": ("forget",)}
            loss, length = config.joint_loss, config.forget_length
        phases.append(Phase(index, kind, sources, loss, length))
    return phases


class PhaseScheduler:
    """Walks the phases one optimizer step at a time; its state restores a run mid-phase.

    Args:
        phases: the plan, from ``plan_phases``.
        steps_per_epoch: for phases measured in epochs, the number of steps in one epoch of that phase
            (the length of its retain-side loader, as in the reference).
        fingerprint: a config hash stored in the state; loading a state with another one is refused.

    Example:
        >>> sched = PhaseScheduler(plan_phases(cfg), steps_per_epoch=lambda p: 10)
        >>> while not sched.done:
        ...     phase = sched.phase   # train one step of this phase
        ...     sched.step()
    """

    def __init__(
        self,
        phases: list[Phase],
        steps_per_epoch: Callable[[Phase], int] | None = None,
        fingerprint: str = "",
    ) -> None:
        if not phases:
            raise SwapConfigError("A swap needs at least one phase.")
        self.phases = phases
        self.fingerprint = fingerprint
        self.phase_steps = [self._resolve(p, steps_per_epoch) for p in phases]
        self.phase_index = 0
        self.step_in_phase = 0

    @staticmethod
    def _resolve(phase: Phase, steps_per_epoch: Callable[[Phase], int] | None) -> int:
        if phase.length.steps is not None:
            return phase.length.steps
        if steps_per_epoch is None:
            raise SwapConfigError(f"Phase {phase.name} is {phase.length} long: give steps_per_epoch.")
        per_epoch = steps_per_epoch(phase)
        if per_epoch < 1:
            raise SwapConfigError(f"Phase {phase.name} has an empty retain-side loader (0 steps per epoch).")
        return phase.length.epochs * per_epoch

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)

    @property
    def phase(self) -> Phase:
        if self.done:
            raise IndexError("The swap is finished: no current phase.")
        return self.phases[self.phase_index]

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    @property
    def global_step(self) -> int:
        return sum(self.phase_steps[: self.phase_index]) + self.step_in_phase

    @property
    def at_phase_start(self) -> bool:
        return not self.done and self.step_in_phase == 0

    def step(self) -> bool:
        """Count one optimizer step; returns True when it ended the current phase."""
        if self.done:
            raise IndexError("step() after the last phase.")
        self.step_in_phase += 1
        if self.step_in_phase >= self.phase_steps[self.phase_index]:
            self.phase_index += 1
            self.step_in_phase = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase_index": self.phase_index,
            "step_in_phase": self.step_in_phase,
            "phase_steps": list(self.phase_steps),
            "plan": [p.name for p in self.phases],
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position; refuse a state written by a different config or plan."""
        plan = [p.name for p in self.phases]
        if state.get("fingerprint") != self.fingerprint or list(state.get("plan", [])) != plan:
            raise SwapConfigError(
                f"Cannot resume: the checkpoint was written by another swap config (plan {state.get('plan')}, "
                f"config {state.get('fingerprint')!r}) than this run (plan {plan}, config {self.fingerprint!r}). "
                "Resume with the original settings or start a new output directory."
            )
        if list(state["phase_steps"]) != self.phase_steps:
            raise SwapConfigError(
                f"Cannot resume: phase lengths changed from {state['phase_steps']} to {self.phase_steps} steps "
                "(different data or batch size). Resume with the original data and batch size."
            )
        self.phase_index = int(state["phase_index"])
        self.step_in_phase = int(state["step_in_phase"])
