"""Running gradient-based work (attributions, Grad-CAM, SHAP) inside Lightning's evaluation loops.

Lightning runs validation/test/predict under ``torch.inference_mode()``: tensors created there are inference
tensors, and autograd refuses them even inside ``torch.enable_grad()``. :func:`gradients_enabled` is the one way a
technique does gradient work during evaluation:

* leaves inference mode and enables grad;
* snapshots and restores the train/eval flag of **every** submodule (pytorch-grad-cam calls ``model.eval()`` and
  never restores it) and the ``requires_grad`` flag of every parameter;
* by default turns parameter gradients **off** for the duration (``params_require_grad=False``): attribution
  methods need gradients with respect to inputs and activations only, and this way no ``.grad`` of the model is
  touched and no DDP gradient hook fires on a rank that works alone;
* restores every parameter's ``.grad`` object afterwards when ``params_require_grad=True``;
* under ``Trainer(deterministic=True)`` (``torch.use_deterministic_algorithms(True)``) it lets ops without a
  deterministic kernel run with a warning instead of raising (backward of max-pooling, max-unpooling in shap's
  DeepExplainer ...): attribution work does not feed training, and refusing it would stop the run. The global
  setting is restored on exit.

Use :func:`usable_tensor` on batch tensors (clones inference tensors into normal ones).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def usable_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor autograd can use: a clone of an inference tensor, the tensor itself otherwise (detached)."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor.detach()


@contextmanager
def gradients_enabled(module: nn.Module, eval_mode: bool = True, params_require_grad: bool = False) -> Iterator[None]:
    """Context in which autograd works on ``module`` even inside Lightning's evaluation loops.

    Args:
        module: the model (its submodules' modes and parameters' flags are restored on exit).
        eval_mode: put the module in eval mode inside the context (the default; dropout off).
        params_require_grad: keep parameters' ``requires_grad`` as they are (True) or turn it off (False).
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in module.parameters()]
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if deterministic and not warn_only:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if eval_mode:
                module.eval()
            if not params_require_grad:
                for p, _, _ in flags:
                    p.requires_grad_(False)
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad, grad in flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        if deterministic and not warn_only:
            torch.use_deterministic_algorithms(True, warn_only=False)


def describe_modes(module: nn.Module) -> dict[str, Any]:
    """``{name: (training, [requires_grad...])}`` snapshot, for tests that assert nothing was changed."""
    return {
        name: (m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for name, m in module.named_modules()
    }
