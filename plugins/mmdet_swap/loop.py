"""The training loop a ``SwapHook`` puts in place of the config's: the swap session's phases, step by step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from mmengine.hooks import CheckpointHook, IterTimerHook
from mmengine.registry import LOOPS
from mmengine.runner import BaseLoop

from kswap import ROLE_KEY, Phase, loss_key, merge_role_batches

from .detector import log_outputs

if TYPE_CHECKING:
    from .hook import SwapHook


def merge_batches(batches: dict[str, dict[str, list]]) -> dict[str, list]:
    """One mmdet data batch from per-role batches, each data sample tagged with its role."""
    return {"inputs": [x for batch in batches.values() for x in batch["inputs"]],
            "data_samples": merge_role_batches({role: batch["data_samples"] for role, batch in batches.items()},
                                               lambda sample, role: sample.set_metainfo({ROLE_KEY: role}))}


def restart_iter_timers(runner: Any) -> None:
    """Restart mmengine's iteration timers after work between two steps (an evaluation), which they would
    otherwise count as the next step's time and in the ETA (mmengine's own loops restart them before validating)."""
    for hook in runner.hooks:
        if isinstance(hook, IterTimerHook):
            hook.before_train_epoch(runner)


@LOOPS.register_module()
class SwapTrainLoop(BaseLoop):
    """Runs the phases of ``swap.session`` (a ``kswap.SwapSession``): each step one batch per loss role of the
    phase, merged into one ``train_step``.

    The runner's hooks are called as by mmengine's loops (``before/after_train``, one ``before/after_train_epoch``
    around the whole swap, ``before/after_train_iter``); the session scores the three sets (the swap hook's
    ``score``) before the swap and at phase ends, where the hook saves unless a ``CheckpointHook`` of the config
    saved that step; the hook writes the outputs.
    """

    def __init__(self, runner: Any, swap: SwapHook) -> None:
        self.swap = swap
        self.session = swap.session
        super().__init__(runner, self._retain_side_loader())
        self._epoch = 0
        self._iter = 0
        self._max_iters = self.session.scheduler.total_steps
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

    def _retain_side_loader(self) -> Any:
        """The current phase's retain-side loader (the last phase's once done), as mmengine's ``dataloader``."""
        index = -1 if self.session.done else self.session.phase.index
        return self.session.loaders[index]["retain"].loader

    def run(self) -> Any:
        return self.swap.undoing_patches_on_error(self._run)()

    def _run(self) -> Any:
        runner, swap, session = self.runner, self.swap, self.session
        runner.call_hook("before_train")
        # The whole swap is one "epoch" for the hooks that keep per-epoch state (timers, loggers).
        runner.call_hook("before_train_epoch")
        swap.before_swap(runner)
        restart_iter_timers(runner)
        self.dataloader = self._retain_side_loader()
        while not session.done:
            phase = session.phase
            # At a phase's first step the session calls swap.start_phase (optimizer reset, log).
            data_batch = merge_batches(session.next_batches())
            self.dataloader = self._retain_side_loader()
            runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
            runner.model.train()
            # The hooks (message hub, logger) see the phase-loss terms under their log keys.
            outputs = log_outputs(runner.model.train_step(data_batch, optim_wrapper=runner.optim_wrapper))
            if session.awaits_forget_loss(phase):
                self.session.observe_forget_loss(outputs[loss_key("forget/task")].detach(), phase)
            # Counted before the hooks run: a checkpoint a CheckpointHook saves now holds this step's position.
            ended = session.count_step()
            hook_saved = self._after_train_iter(data_batch, outputs, phase if ended else None)
            self._iter += 1
            if not hook_saved and (ended or swap.checkpoint_due(self._iter)):
                swap.save()
            if ended:  # scoring and saving are no part of the next step's time
                restart_iter_timers(runner)
        runner.call_hook("after_train_epoch")
        runner.call_hook("after_train")
        swap.finish(runner)
        return runner.model

    def _after_train_iter(self, data_batch: dict, outputs: Mapping[str, torch.Tensor],
                         ended: Phase | None) -> bool:
        """mmengine's ``after_train_iter`` on every hook, the checkpoint hooks last; a phase that ``ended`` at
        this step is scored (and logged) before they run, so that a checkpoint they write holds its scores.

        Returns:
            Whether a checkpoint hook saved at this step (then the swap does not save the same step again).
        """
        runner = self.runner
        savers = [h for h in runner.hooks if isinstance(h, CheckpointHook)]
        kwargs = dict(batch_idx=self._iter, data_batch=data_batch, outputs=outputs)
        for hook in runner.hooks:
            if hook not in savers:
                hook.after_train_iter(runner, **kwargs)
        if ended is not None:
            scores = self.session.score_phase_end(ended, self.session.scheduler.global_step)
            if scores is not None:
                self.swap.log_scores(runner, scores)
        last = runner.message_hub.get_info("last_ckpt")
        for hook in savers:
            hook.after_train_iter(runner, **kwargs)
        return runner.message_hub.get_info("last_ckpt") != last

