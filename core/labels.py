"""The joint label space of a swapped model and the three class sets resolved in it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .adapter import SwapRound
from .config import ClassRef, SwapConfig
from .errors import SwapConfigError


@dataclass(frozen=True)
class ClassSets:
    """Label ids of the forget, retain and learn sets in the joint label space, and of the classes earlier rounds
    forgot that stay forgotten (in no set: neither retained nor learned)."""

    forget: tuple[int, ...]
    retain: tuple[int, ...]
    learn: tuple[int, ...]
    kept_forgotten: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"forget": self.forget, "retain": self.retain, "learn": self.learn}


@dataclass(frozen=True)
class LabelSpace:
    """Pretrained classes keep their ids ``0..N-1``; new classes get ``N..N+K-1`` in the order given.

    The map is explicit: a label id is always looked up here, never computed with an offset.

    Args:
        pretrained: names of the pretrained model's classes, indexed by label id (a swapped model's: its joint
            classes).
        new: names of the classes to learn.
        forgotten: pretrained classes that earlier rounds forgot: kept forgotten (retained only when the retain set
            names them).
    """

    pretrained: tuple[str, ...]
    new: tuple[str, ...] = ()
    forgotten: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pretrained", tuple(str(n) for n in self.pretrained))
        object.__setattr__(self, "new", tuple(str(n) for n in self.new))
        object.__setattr__(self, "forgotten", tuple(str(n) for n in self.forgotten))
        if not self.pretrained:
            raise SwapConfigError("The pretrained label space is empty: give the model's class names.")
        for label, names in (("pretrained", self.pretrained), ("new", self.new)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise SwapConfigError(f"The {label} class names repeat {dup}; class names must be unique.")
        clash = sorted(set(self.pretrained) & set(self.new))
        if clash:
            again = sorted(set(clash) & set(self.forgotten))
            raise SwapConfigError(
                f"The classes to learn {clash} already exist in the pretrained model: rename them or move them "
                "to the retain set" + (f" (an earlier round forgot {again}: retaining them learns them again)."
                                       if again else ".")
            )
        unknown = sorted(set(self.forgotten) - set(self.pretrained))
        if unknown:
            raise SwapConfigError(f"The forgotten classes {unknown} are not classes of the model.")

    @property
    def names(self) -> tuple[str, ...]:
        return self.pretrained + self.new

    @property
    def num_pretrained(self) -> int:
        return len(self.pretrained)

    @property
    def num_classes(self) -> int:
        """Size of the joint head (without any trailing no-object row)."""
        return len(self.pretrained) + len(self.new)

    def id_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise SwapConfigError(f"Unknown class {name!r}.") from None

    def resolve(self, config: SwapConfig) -> ClassSets:
        """Resolve the config's class references to ids; raise on unknown, missing or overlapping classes."""
        if tuple(str(c) for c in config.learn) != self.new:
            raise SwapConfigError(
                f"The label space's new classes {list(self.new)} differ from the config's learn set "
                f"{list(config.learn)}; build it with LabelSpace.for_config."
            )
        forget = self._pretrained_ids(config.forget, "forget")
        forgotten = {self.id_of(n) for n in self.forgotten}
        if config.retain is None:
            retain = tuple(i for i in range(self.num_pretrained) if i not in forget and i not in forgotten)
        else:
            retain = self._pretrained_ids(config.retain, "retain")
        overlap = sorted(set(forget) & set(retain))
        if overlap:
            names = [self.pretrained[i] for i in overlap]
            raise SwapConfigError(f"Classes {names} are in both the forget and the retain set; pick one for each.")
        if not retain:
            raise SwapConfigError("The retain set is empty: forgetting every pretrained class leaves nothing to keep.")
        learn = tuple(range(self.num_pretrained, self.num_classes))
        kept = tuple(sorted(forgotten - set(forget) - set(retain)))
        return ClassSets(forget=forget, retain=retain, learn=learn, kept_forgotten=kept)

    @classmethod
    def for_config(cls, pretrained: Sequence[str], config: SwapConfig,
                   rounds: Sequence[SwapRound] = ()) -> LabelSpace:
        """The label space of ``pretrained`` extended by the config's learn classes; after earlier ``rounds``
        (``pretrained`` being the swapped model's classes), the classes they forgot stay forgotten."""
        ids = [c for c in config.learn if isinstance(c, int)]
        if ids:
            raise SwapConfigError(
                f"The learn set must name its classes (got ids {ids}): new classes have no id before the swap."
            )
        forgotten = dict.fromkeys(c for r in rounds for c in r.forget if c in pretrained)
        return cls(tuple(pretrained), tuple(str(c) for c in config.learn), tuple(forgotten))

    def _pretrained_ids(self, refs: Sequence[ClassRef], set_name: str) -> tuple[int, ...]:
        ids = []
        unknown = []
        for ref in refs:
            if isinstance(ref, int):
                if 0 <= ref < self.num_pretrained:
                    ids.append(ref)
                else:
                    unknown.append(ref)
            elif ref in self.pretrained:
                ids.append(self.pretrained.index(ref))
            elif ref.isdigit() and int(ref) < self.num_pretrained and ref not in self.new:
                ids.append(int(ref))
            else:
                unknown.append(ref)
        if unknown:
            shown = ", ".join(map(repr, self.pretrained[:12])) + (", ..." if self.num_pretrained > 12 else "")
            raise SwapConfigError(
                f"The {set_name} set names {unknown}, which the pretrained model does not know. "
                f"Its {self.num_pretrained} classes are: {shown} (names, or ids 0..{self.num_pretrained - 1})."
            )
        return tuple(ids)


def earlier_round_sets(rounds: Sequence[SwapRound]) -> dict[str, tuple[str, ...]]:
    """The sets of earlier rounds a next round scores: ``forget_r<k>``, the classes round k forgot, and
    ``learn_r<k>``, those it learned and no later round forgot."""
    out: dict[str, tuple[str, ...]] = {}
    for r in rounds:
        forgotten_later = {c for later in rounds if later.round > r.round for c in later.forget}
        learned = tuple(c for c in r.learn if c not in forgotten_later)
        if r.forget:
            out[f"forget_r{r.round}"] = r.forget
        if learned:
            out[f"learn_r{r.round}"] = learned
    return out
