"""kswap: knowledge swapping (forget, retain and learn classes at once) for vision models.

The core is framework-free. The flow a host follows:

1. ``SwapConfig`` (or ``SwapConfig.preset(task)``) and ``LabelSpace.for_config`` resolve the class sets;
2. ``prepare_model`` checks and grows the head (``extend_head``), injects LoRA (``inject_lora``), freezes the rest
   and finds the group-sparsity groups (``lora_groups``); ``adapt_model`` does the last three for a host that grows
   its heads itself, and ``adapt_checkpoint`` fits a pretrained checkpoint to the prepared model;
3. ``SwapSession`` drives the swap behind a ``SwapHost`` (a role's loader, task losses, scores, phase start, save):
   ``plan_phases`` / ``PhaseScheduler`` walk the phases, ``PhaseLoss`` combines the host's task losses with the
   forget bound checked (and resolved, when relative) by ``SwapReport.start_forget_phase``, "before" is scored
   inside ``hidden_new_classes`` (the pretrained model's own predictions);
4. ``SwapReport`` records per-set scores and writes JSON, Markdown and a plot; ``SwapSession.export`` (or
   ``merge_and_export``) gives the plain model back, and ``run_audit`` checks that forgotten knowledge is gone;
5. ``apply_adapter`` re-applies a swap's adapter to the model it started from, ``revert_adapter`` reverts it, and
   ``rounds_of`` reads a swapped model's rounds, from which a next round (``SwapSession(history=...)``) goes on.
"""

from .adapter import (
    AppliedAdapter,
    SwapAdapter,
    SwapRound,
    apply_adapter,
    file_sha256,
    parent_of,
    revert_adapter,
    rounds_of,
)
from .audit import AuditHost, AuditSettings, run_audit
from .checkpoint import atomic_save, atomic_write_text, load_checkpoint
from .config import (
    PRESETS,
    ConfigField,
    ForgetLoss,
    LearnLoss,
    LoraSettings,
    LossWeights,
    Order,
    PhaseLength,
    SwapConfig,
    arg_docs,
    config_fields,
    config_from_fields,
)
from .data import ROLE_KEY, InfiniteLoader, ResumableSampler, drawn_indices, merge_role_batches, role_rows
from .errors import CheckpointMismatchError, SwapConfigError
from .export import ADAPTER_FILE, MODEL_FILE, loss_key, score_key, write_adapter, write_merged_model
from .groups import discover_groups
from .heads import (
    GrownRows,
    captured_input,
    check_head_size,
    extend_embedding,
    extend_head,
    grow_checkpoint_rows,
    hidden_new_classes,
    imprinted_rows,
    replace_module,
    sigmoid_prior_bias,
)
from .interrupt import StopRequests
from .labels import ClassSets, LabelSpace, earlier_round_sets
from .lora import (
    TARGET_PRESETS,
    LoraSnapshot,
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
    validate_lora_state,
)
from .losses import (
    PhaseLoss,
    PhaseLossOutput,
    bounded_forget_loss,
    distillation_loss,
    feature_mmd_loss,
    group_sparse_loss,
    sum_task_loss,
)
from .metrics import SETS, AccuracyMeter, swap_hmean, top1_accuracy
from .phases import Phase, PhaseKind, PhaseScheduler, plan_phases
from .report import SwapReport
from .session import (
    PERIODIC_SCORE_IMAGES,
    PreparedModel,
    SwapHost,
    SwapSession,
    adapt_checkpoint,
    adapt_model,
    grow_head,
    prepare_model,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_FILE", "MODEL_FILE", "PERIODIC_SCORE_IMAGES", "PRESETS", "ROLE_KEY", "SETS", "TARGET_PRESETS",
    "AccuracyMeter", "AppliedAdapter", "AuditHost", "AuditSettings", "CheckpointMismatchError", "ClassSets",
    "ConfigField", "ForgetLoss", "GrownRows", "InfiniteLoader", "LabelSpace", "LearnLoss", "LoraSettings",
    "LoraSnapshot", "LossWeights", "Order", "Phase", "PhaseKind", "PhaseLength", "PhaseLoss", "PhaseLossOutput",
    "PhaseScheduler", "PreparedModel", "ResumableSampler", "StopRequests", "SwapAdapter", "SwapConfig",
    "SwapConfigError", "SwapHost", "SwapReport", "SwapRound", "SwapSession", "adapt_checkpoint", "adapt_model",
    "apply_adapter", "arg_docs", "atomic_save", "atomic_write_text", "bounded_forget_loss", "captured_input",
    "check_head_size", "config_fields", "config_from_fields", "discover_groups", "distillation_loss", "drawn_indices",
    "earlier_round_sets", "extend_embedding", "extend_head", "feature_mmd_loss", "file_sha256", "freeze_all_but_lora_",
    "group_sparse_loss", "grow_checkpoint_rows", "grow_head", "hidden_new_classes", "imprinted_rows", "inject_lora",
    "load_checkpoint", "load_lora_model_state", "lora_groups", "lora_state_dict", "loss_key", "matching_linears",
    "merge_and_export", "merge_role_batches", "parent_of", "plan_phases", "prepare_model", "pretrained_model",
    "reinit_lora_", "replace_module", "revert_adapter", "role_rows", "rounds_of", "run_audit", "score_key",
    "sigmoid_prior_bias", "sum_task_loss", "swap_hmean", "to_injected_keys", "to_plain_keys", "top1_accuracy",
    "validate_lora_state", "write_adapter", "write_merged_model",
]
