"""The training loop a ``SwapHook`` puts in place of the config's: the swap's phases, step by step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mmengine.hooks import IterTimerHook
from mmengine.runner import BaseLoop

from .detector import ROLE_KEY, log_outputs

if TYPE_CHECKING:
    from .hook import SwapHook


def merge_batches(batches: dict[str, dict[str, list]]) -> dict[str, list]:
    """One mmdet data batch from per-role batches, each sample tagged with its role."""
    merged: dict[str, list] = {"inputs": [], "data_samples": []}
    for role, batch in batches.items():
        for sample in batch["data_samples"]:
            sample.set_metainfo({ROLE_KEY: role})
        merged["inputs"].extend(batch["inputs"])
        merged["data_samples"].extend(batch["data_samples"])
    return merged


def restart_iter_timers(runner: Any) -> None:
    """Restart mmengine's iteration timers after work between two steps (an evaluation), which they would
    otherwise count as the next step's time and in the ETA (mmengine's own loops restart them before validating)."""
    for hook in runner.hooks:
        if isinstance(hook, IterTimerHook):
            hook.before_train_epoch(runner)


class SwapTrainLoop(BaseLoop):
    """Runs the swap's phases: each step one batch per loss role of the phase, merged into one ``train_step``.

    The runner's hooks are called as by mmengine's loops (``before/after_train``, one ``before/after_train_epoch``
    around the whole swap, ``before/after_train_iter``); the swap hook evaluates the three sets at phase ends.
    """

    def __init__(self, runner: Any, swap: SwapHook) -> None:
        self.swap = swap
        super().__init__(runner, swap.retain_side_loader())
        self._epoch = 0
        self._iter = 0
        self._max_iters = swap.scheduler.total_steps
        self.stop_training = False

    @property
    def max_epochs(self) -> int:
        return 1

    @property
    def max_iters(self) -> int:
        return self._max_iters

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def iter(self) -> int:
        return self._iter

    def run(self) -> Any:
        runner, swap = self.runner, self.swap
        runner.call_hook("before_train")
        # The whole swap is one "epoch" for the hooks that keep per-epoch state (timers, loggers).
        runner.call_hook("before_train_epoch")
        swap.before_swap(runner)
        restart_iter_timers(runner)
        self.dataloader = swap.retain_side_loader()
        while not swap.scheduler.done:
            phase = swap.scheduler.phase
            if swap.scheduler.at_phase_start:
                swap.start_phase(runner, phase)
                self.dataloader = swap.retain_side_loader()
            data_batch = merge_batches({role: next(it) for role, it in swap.phase_loaders[phase.index].items()})
            runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
            runner.model.train()
            # The hooks (message hub, logger) see the phase-loss terms under their log keys.
            outputs = log_outputs(runner.model.train_step(data_batch, optim_wrapper=runner.optim_wrapper))
            swap.check_forget_bound(runner, phase, outputs)
            runner.call_hook("after_train_iter", batch_idx=self._iter, data_batch=data_batch, outputs=outputs)
            self._iter += 1
            if swap.scheduler.step():
                swap.end_phase(runner, phase)
                restart_iter_timers(runner)
            elif not swap.scheduler.done:
                swap.after_step(runner)
        runner.call_hook("after_train_epoch")
        runner.call_hook("after_train")
        swap.finish(runner)
        return runner.model
