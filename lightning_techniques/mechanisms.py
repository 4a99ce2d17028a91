"""The shared mechanisms, for authors of techniques (yours or this package's): the one documented module to build a
new technique on. Each kind of reach into a run that a plain Lightning callback cannot make has exactly one mechanism
here (``ARCHITECTURE.md`` section 4); a technique uses it instead of patching the module itself, and so inherits its
guarantees - undone when the run ends *or fails*, correct under DDP and AMP, exact on resume.

=========================  ==========================================================================================
``add_loss_term``          add a term to the loss ``training_step`` returns (L1, distillation, VAT ...)
``CriterionHandle``        find the module's loss-module attribute and reconfigure or swap it for the run
``SteeringCallback``       base of callbacks that decide which samples the train loader yields (``SteeredSampler``)
``add_batch_transform``    transform the on-device batch per stage (``on_after_batch_transfer`` of module/datamodule)
``EvaluationCallback``     collect during validation / test; ``gradients_enabled`` for gradient work inside them
``ArtifactLogger``         images, figures, tables, arrays to the attached logger or to files (rank 0, atomic)
``broadcast_module_`` ...  rank-0 work + broadcast, float64 all-reduce, agreed decisions (no-ops in one process)
``check_conflicts``        the setup-time check of ``takes_over`` / ``conflicts_with`` (vocabulary: ``MECHANISMS``)
``interpolate``            the schedule core (``progress`` in [0, 1] and a shape: linear, cosine, exponential ...)
``log_step_metrics``       per-step scalars at the Trainer's ``log_every_n_steps`` cadence
``recall_grad_norm``       the step's total gradient norm from an earlier technique (``remember_grad_norm``; norms in
                           float32 of any dtype: ``float32_norms``) - valid for the same, unchanged tensors only
``MethodPatch``            a reversible wrapper layer on one instance method (one stack per method, any order)
``LeanHooks``              mixin (first base): Lightning skips the per-batch hooks the class does not implement
``needed_while``           decorator: a per-batch hook Lightning calls only while ``predicate(self)`` holds
=========================  ==========================================================================================

Example - a technique that adds ``0.01 * ||w||^2`` to the loss, and nothing else to remember::

    from lightning.pytorch.callbacks import Callback
    from lightning_techniques.mechanisms import LeanHooks, add_loss_term, check_conflicts

    class TinyL2(LeanHooks, Callback):
        takes_over = frozenset({"loss_term"})
        conflicts_with = ()

        def setup(self, trainer, pl_module, stage):
            check_conflicts(trainer, self)
            # fn(module, batch, batch_idx, loss); removed by the mechanism when the run ends or fails
            add_loss_term(pl_module, "tiny_l2",
                          lambda module, batch, batch_idx, loss: 0.01 * sum((p ** 2).sum() for p in module.parameters()))

The names below are stable; the modules of ``lightning_techniques._internal`` behind them are not.
"""

from __future__ import annotations

from lightning_techniques._internal import *  # noqa: F401,F403
from lightning_techniques._internal import __all__ as _internal_all
from lightning_techniques._internal.grad_norms import float32_norms  # noqa: F401 (re-exported)
from lightning_techniques._internal.grad_norms import recall as recall_grad_norm  # noqa: F401 (re-exported)
from lightning_techniques._internal.grad_norms import remember as remember_grad_norm  # noqa: F401 (re-exported)
from lightning_techniques._internal.lean_hooks import needed_while  # noqa: F401 (re-exported)
from lightning_techniques._internal.schedule import SHAPES, interpolate, progress  # noqa: F401 (re-exported)
from lightning_techniques._internal.step_logging import log_step_metrics, should_log_step  # noqa: F401 (re-exported)

__all__ = sorted({*_internal_all, "SHAPES", "interpolate", "progress", "log_step_metrics", "should_log_step",
                  "float32_norms", "recall_grad_norm", "remember_grad_norm", "needed_while"})
