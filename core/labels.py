"""The joint label space of a swapped model and the three class sets resolved in it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import ClassRef, SwapConfig
from .errors import SwapConfigError


@dataclass(frozen=True)
class ClassSets:
    """Label ids of the forget, retain and learn sets in the joint label space."""

    forget: tuple[int, ...]
    retain: tuple[int, ...]
    learn: tuple[int, ...]

    def as_dict(self) -> dict[str, tuple[int, ...]]:
        return {"forget": self.forget, "retain": self.retain, "learn": self.learn}


@dataclass(frozen=True)
class LabelSpace:
    """Pretrained classes keep their ids ``0..N-1``; new classes get ``N..N+K-1`` in the order given.

    The map is explicit: a label id is always looked up here, never computed with an offset.

    Args:
        pretrained: names of the pretrained model's classes, indexed by label id.
        new: names of the classes to learn.
    """

    pretrained: tuple[str, ...]
    new: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pretrained", tuple(str(n) for n in self.pretrained))
        object.__setattr__(self, "new", tuple(str(n) for n in self.new))
        if not self.pretrained:
            raise SwapConfigError("The pretrained label space is empty: give the model's class names.")
        for label, names in (("pretrained", self.pretrained), ("new", self.new)):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise SwapConfigError(f"The {label} class names repeat {dup}; class names must be unique.")
        clash = sorted(set(self.pretrained) & set(self.new))
        if clash:
            raise SwapConfigError(
                f"The classes to learn {clash} already exist in the pretrained model: rename them or move them "
                "to the retain set."
            )

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
        if config.retain is None:
            retain = tuple(i for i in range(self.num_pretrained) if i not in forget)
        else:
            retain = self._pretrained_ids(config.retain, "retain")
        overlap = sorted(set(forget) & set(retain))
        if overlap:
            names = [self.pretrained[i] for i in overlap]
            raise SwapConfigError(f"Classes {names} are in both the forget and the retain set; pick one for each.")
        if not retain:
            raise SwapConfigError("The retain set is empty: forgetting every pretrained class leaves nothing to keep.")
        learn = tuple(range(self.num_pretrained, self.num_classes))
        return ClassSets(forget=forget, retain=retain, learn=learn)

    @classmethod
    def for_config(cls, pretrained: Sequence[str], config: SwapConfig) -> LabelSpace:
        """The label space of ``pretrained`` extended by the config's learn classes."""
        ids = [c for c in config.learn if isinstance(c, int)]
        if ids:
            raise SwapConfigError(
                f"The learn set must name its classes (got ids {ids}): new classes have no id before the swap."
            )
        return cls(tuple(pretrained), tuple(str(c) for c in config.learn))

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
