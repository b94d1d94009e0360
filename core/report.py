"""The swap report: per-set scores before and after each phase and over steps, as JSON, Markdown and a plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import LossWeights
from .metrics import GOALS, SETS, swap_hmean

Scores = dict[str, float]


@dataclass
class SwapReport:
    """Collects scores while a swap runs and writes them out.

    Args:
        order: the phase order.
        metric: the name of the per-set score (``top1``, ``bbox_mAP``, ``mIoU``), in percent.
        classes: per set, the class names, for the report header.
    """

    order: str
    metric: str = "top1"
    classes: Mapping[str, list[str]] = field(default_factory=dict)
    before: Scores | None = None
    phases: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    forget_bounds: dict[str, dict[str, Any]] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    # The model's swap rounds, this one last (``SwapRound.to_dict()``); scores of earlier rounds' sets are extra
    # scores named ``<set>_r<round>``.
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # Seconds spent scoring the sets and running the swap (scoring included), summed over resumed runs.
    timing: dict[str, float] = field(default_factory=lambda: {"scoring_s": 0.0, "run_s": 0.0})
    # The run clock: started with the report (created, or loaded by a resumed run); ``tick`` adds its time.
    _clock: float = field(default_factory=time.perf_counter, init=False, repr=False, compare=False)

    def tick(self) -> None:
        """Add the wall time since the report was made or last ticked to ``timing["run_s"]`` (a host ticks before
        saving its state and before writing the report, so a resumed run goes on adding)."""
        now = time.perf_counter()
        self.timing["run_s"] += now - self._clock
        self._clock = now

    @contextlib.contextmanager
    def timed(self, key: str = "scoring_s") -> Iterator[None]:
        """Add the wall time of the ``with`` block to ``timing[key]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - start

    def start_forget_phase(self, phase: str, weights: LossWeights, measured_forget_loss: float) -> str | None:
        """Record the forget-set task loss measured at the start of ``phase`` and the bound it works against.

        Returns:
            A warning to log when the bound is inactive (the loss already at or above it: the forgetting term is
            zero and nothing would be forgotten), else ``None``.
        """
        bound = weights.resolve_bound(measured_forget_loss).bnd
        active = measured_forget_loss < bound
        self.forget_bounds[phase] = {"measured_forget_loss": float(measured_forget_loss), "bnd": float(bound),
                                     "relative": weights.bnd_relative, "active": active}
        if active:
            return None
        return (f"phase {phase}: the forget-set task loss at the phase start ({measured_forget_loss:.3g}) is already "
                f"at or above the forgetting bound BND={bound:.3g}, so the bounded forgetting term is 0 and nothing "
                "will be forgotten. Raise BND above it, or set a relative bound (bnd_relative with bnd e.g. 3: "
                "three times the measured loss).")

    def phase_weights(self, phase: str, weights: LossWeights) -> LossWeights:
        """``weights`` with a relative bound resolved by the measurement recorded for ``phase`` (as they are
        before that measurement)."""
        bound = self.forget_bounds.get(phase)
        if bound is None or not weights.bnd_relative:
            return weights
        return dataclasses.replace(weights, bnd=bound["bnd"], bnd_relative=False)

    def record(self, step: int, phase: str, scores: Mapping[str, float], images: Mapping[str, int] | None = None,
               subsample: bool = False) -> None:
        """Add a point of the per-set curves (an evaluation at ``step`` during ``phase``).

        Args:
            images: per set, the number of images scored.
            subsample: the scores are of a seeded subsample of each set (periodic scores), not the whole set.
        """
        row: dict[str, Any] = {"step": step, "phase": phase, **_scores(scores)}
        if images is not None:
            row.update(images=dict(images), subsample=subsample)
        self.curve.append(row)

    def set_before(self, scores: Mapping[str, float], images: Mapping[str, int] | None = None) -> None:
        self.before = _scores(scores)
        self.record(0, "before", scores, images)

    def end_phase(self, name: str, kind: str, step: int, scores: Mapping[str, float],
                  images: Mapping[str, int] | None = None) -> None:
        """Record the scores at the end of a phase (the phase's "before" is the previous phase's "after")."""
        start = self.phases[-1]["after"] if self.phases else self.before
        self.phases.append({"name": name, "kind": kind, "end_step": step, "before": start, "after": _scores(scores)})
        if not self.curve or self.curve[-1]["step"] != step:
            self.record(step, name, scores, images)

    @property
    def after(self) -> Scores | None:
        return self.phases[-1]["after"] if self.phases else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "order": self.order,
            "metric": self.metric,
            "classes": {k: list(v) for k, v in self.classes.items()},
            "metrics": {"before": self.before, "after": self.after, "phases": self.phases},
            "curve": self.curve,
            "forget_bounds": self.forget_bounds,
            "audit": self.audit,
            "rounds": self.rounds,
            "timing": self.timing,
        }
        if self.before and self.after:
            out["hmean"] = swap_hmean(self.before, self.after)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SwapReport:
        metrics = data["metrics"]
        return cls(
            order=data["order"],
            metric=data.get("metric", "top1"),
            classes=data.get("classes", {}),
            before=metrics.get("before"),
            phases=list(metrics.get("phases", [])),
            curve=list(data.get("curve", [])),
            forget_bounds=dict(data.get("forget_bounds", {})),
            audit=dict(data.get("audit", {})),
            rounds=list(data.get("rounds", [])),
            timing={"scoring_s": 0.0, "run_s": 0.0, **data.get("timing", {})},
        )

    def to_markdown(self) -> str:
        """A table: one row per set, its goal, the score before and after each phase."""
        heads = ["set", "goal", "before"] + [f"after {p['name']}" for p in self.phases]
        lines = [
            f"# Knowledge swap report ({self.order}, {self.metric} %)",
            "",
            "| " + " | ".join(heads) + " |",
            "|" + "---|" * len(heads),
        ]
        for s in [*SETS, *[k for k in self.before or {} if k not in SETS]]:
            row = [s, _goal(s), _fmt(self.before, s)]
            row += [_fmt(p["after"], s) for p in self.phases]
            lines.append("| " + " | ".join(row) + " |")
        summary = self.to_dict().get("hmean")
        if summary is not None:
            lines += ["", f"H-mean of (forget drop, retain, learn): {summary:.2f} (library extra, not a paper metric)"]
        for phase, bound in self.forget_bounds.items():
            state = "active" if bound["active"] else "INACTIVE: nothing was forgotten by the bounded term"
            lines.append(f"- {phase}: forget loss at start {bound['measured_forget_loss']:.3g}, "
                         f"BND {bound['bnd']:.3g} ({state})")
        for s in SETS:
            if self.classes.get(s):
                lines.append(f"- {s}: {', '.join(map(str, self.classes[s]))}")
        if len(self.rounds) > 1:
            lines += [f"- round {r['round']}: forgot {', '.join(r['forget']) or '-'}; learned "
                      f"{', '.join(r['learn']) or '-'}" for r in self.rounds]
        lines += self._scoring_markdown()
        lines += _audit_markdown(self.audit)
        return "\n".join(lines) + "\n"

    def _scoring_markdown(self) -> list[str]:
        """How the scores were computed (images per set, whole sets or subsamples) and what scoring cost."""
        lines = []
        full = next((r["images"] for r in self.curve if "images" in r and not r["subsample"]), None)
        if full:
            lines.append("- before and after each phase: the whole test sets ("
                         + ", ".join(f"{s} {n}" for s, n in full.items()) + " images)")
        sub = next((r["images"] for r in self.curve if r.get("subsample")), None)
        if sub:
            lines.append("- scores between phase ends (curve): a seeded subsample of each set ("
                         + ", ".join(f"{s} {n}" for s, n in sub.items()) + " images)")
        if self.timing["run_s"] > 0:
            share = 100 * self.timing["scoring_s"] / self.timing["run_s"]
            lines.append(f"- scoring took {self.timing['scoring_s']:.0f} s of the run's {self.timing['run_s']:.0f} s "
                         f"({share:.1f} %)")
        return lines

    def plot(self, path: str | Path) -> Path:
        """Save the per-set curves over steps, with the phase ends marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [p["step"] for p in self.curve]
        for s in SETS:
            ax.plot(steps, [p[s] for p in self.curve], marker="o", label=f"{s} ({GOALS[s]})")
        for phase in self.phases:
            ax.axvline(phase["end_step"], color="grey", linestyle="--", linewidth=0.8)
            ax.annotate(phase["name"], (phase["end_step"], 1), rotation=90, va="bottom", ha="right", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.metric} (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"Knowledge swap ({self.order})")
        ax.legend(loc="best")
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        tmp.replace(path)
        return path

    def write(self, out_dir: str | Path, stem: str = "swap_report") -> dict[str, Path]:
        """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` atomically into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=2))
        atomic_write_text(paths["md"], self.to_markdown())
        self.plot(paths["png"])
        return paths


def _scores(scores: Mapping[str, float]) -> Scores:
    """The three sets' scores, then any extra score a host adds (e.g. detection's ``forget_any``)."""
    missing = [s for s in SETS if s not in scores]
    if missing:
        raise ValueError(f"Scores need forget, retain and learn; missing {missing}.")
    return {**{s: float(scores[s]) for s in SETS}, **{k: float(v) for k, v in scores.items() if k not in SETS}}


def _goal(score: str) -> str:
    """Which way a score should move: an extra score ``<set>_<variant>`` moves like its set's."""
    goal = GOALS.get(score.partition("_")[0])
    return "-" if goal is None else "lower" if goal == "down" else "higher"


def _fmt(scores: Mapping[str, float] | None, s: str) -> str:
    return "-" if scores is None or s not in scores else f"{scores[s]:.2f}"


def _audit_markdown(audit: Mapping[str, Any]) -> list[str]:
    """The audit as a table: one row per model (pretrained, swapped, ...), one column per measurement."""
    models = [m for m, row in audit.items() if m not in ("settings", "neighbours", "verdict")]
    if not models:
        return []
    columns = sorted({key for m in models for key in audit[m]})
    lines = ["", "## Unlearning audit", ""]
    if "verdict" in audit:
        lines += [f"Verdict: {audit['verdict']}.", ""]
    lines += ["| model | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for m in models:
        cells = [audit[m].get(c) for c in columns]
        lines.append(f"| {m} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
    if "neighbours" in audit:
        lines.append(f"Neighbour classes of the forgotten ones: {audit['neighbours']}")
    if "settings" in audit:
        lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in audit["settings"].items())]
    return lines
