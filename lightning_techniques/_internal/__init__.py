"""The shared mechanisms every technique uses (ARCHITECTURE.md section 4). One of each, nothing technique-specific.

* :mod:`.loss_terms` - add a term to the training loss without editing ``training_step``.
* :mod:`.criterion` - find and reconfigure the module's criterion attribute (class weights, label smoothing ...).
* :mod:`.sampling` - steer which samples the train loader yields, correct under DDP and mid-epoch resume.
* :mod:`.batch_transforms` - transform the on-device batch at train (and eval/predict) time.
* :mod:`.eval_grad` - gradient work inside Lightning's ``inference_mode`` evaluation.
* :mod:`.eval_stages` - one routing of the validation/test hooks for callbacks that collect during evaluation.
* :mod:`.artifacts` - images / figures / tables / arrays to whatever logger is attached, or to files.
* :mod:`.distributed` - rank-0 work + broadcast, all-reduced statistics, agreed decisions.
* :mod:`.batch` - the input/target of a tuple, list, dict or tensor batch.
* :mod:`.validation` - argument checks with messages that name the argument and what is allowed.
* :mod:`.patching` - one reversible wrapper stack per (object, method), layers removable in any order; and
  ``undo_at_run_end``: every mechanism registers its undo action there, so what it installed is removed when a run
  ends or fails even if the technique forgets (one clean-up callback per Trainer, ``MechanismCleanup``).
* :mod:`.conflicts` - ``takes_over`` / ``conflicts_with`` declarations and the one setup-time conflict check.
* :mod:`.compat` - every use of Lightning's private API, in one place.
* :mod:`.lean_hooks` - ``LeanHooks``: the per-batch hooks a callback does not implement are skipped by Lightning's
  dispatcher instead of being called as no-ops.
"""

from lightning_techniques._internal.artifacts import ArtifactLogger, artifact_dir, atomic_torch_save, atomic_write_bytes
from lightning_techniques._internal.batch import get_inputs, get_targets, set_inputs, set_targets
from lightning_techniques._internal.batch_transforms import BatchTransformCallback, add_batch_transform, current_stage
from lightning_techniques._internal.conflicts import EXCLUSIVE, MECHANISMS, check_conflicts
from lightning_techniques._internal.criterion import CriterionHandle, find_criterion
from lightning_techniques._internal.distributed import (
    agree_all,
    agree_any,
    all_reduce_max,
    all_reduce_min,
    all_reduce_sum,
    broadcast_module_,
    broadcast_object,
    is_distributed,
)
from lightning_techniques._internal.eval_grad import gradients_enabled, usable_tensor
from lightning_techniques._internal.eval_stages import EvaluationCallback
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.loss_terms import add_loss_term, registered_loss_terms
from lightning_techniques._internal.patching import MechanismCleanup, MethodPatch, undo_at_run_end
from lightning_techniques._internal.sampling import (
    SamplerSteering,
    SteeredSampler,
    SteeringCallback,
    seeded_permutation,
)

__all__ = [
    "EXCLUSIVE",
    "MECHANISMS",
    "ArtifactLogger",
    "BatchTransformCallback",
    "CriterionHandle",
    "EvaluationCallback",
    "LeanHooks",
    "MechanismCleanup",
    "MethodPatch",
    "SamplerSteering",
    "SteeredSampler",
    "SteeringCallback",
    "add_batch_transform",
    "add_loss_term",
    "agree_all",
    "agree_any",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "artifact_dir",
    "atomic_torch_save",
    "atomic_write_bytes",
    "broadcast_module_",
    "broadcast_object",
    "check_conflicts",
    "current_stage",
    "find_criterion",
    "get_inputs",
    "get_targets",
    "gradients_enabled",
    "is_distributed",
    "registered_loss_terms",
    "seeded_permutation",
    "set_inputs",
    "set_targets",
    "undo_at_run_end",
    "usable_tensor",
]
