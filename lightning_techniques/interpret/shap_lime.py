"""SHAP (Lundberg & Lee 2017, through ``shap``) and LIME (Ribeiro et al. 2016, through Captum) attributions and
their loggers.

Functional core:

* :func:`shap_attributions` - ``shap.GradientExplainer`` (expected gradients) or ``shap.DeepExplainer``
  (DeepLIFT-style SHAP), explaining one class logit per sample against a background set.
* :func:`deep_explainer_problems` - why ``shap.DeepExplainer`` would give wrong values on a model (in-place
  activations, modules called more than once per forward, layer types it does not know). Functional non-linearities
  (``F.relu``) cannot be seen from the module tree; they are caught by shap's additivity check.
* :func:`superpixel_mask` / :func:`lime_attributions` - Captum's ``Lime`` over grid superpixels (images) or single
  features (flat inputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_techniques._internal.eval_grad import gradients_enabled, usable_tensor
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_number, check_positive
from lightning_techniques.interpret.attribution import (
    AttributionLogger,
    Explain,
    Selection,
    _baseline_like,
    _first_loader,
    _target_list,
    private_rng,
)

Explainer = Literal["gradient", "deep", "auto"]
EXPLAINERS = ("gradient", "deep", "auto")


class _SelectOutput(nn.Module):
    """``model(x)[:, [index]]``: a single-output view of a classifier, so shap explains one class only."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        self.model = model
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[:, self.index : self.index + 1]


@contextmanager
def _no_leftovers(model: nn.Module) -> Iterator[None]:
    """Remove any hook or parameter that shap added to ``model`` and failed to remove (it cleans up only on
    success; DeepExplainer stores its interim tensors as ``x`` / ``y`` parameters of every non-linear layer)."""
    before = {
        m: (set(m._parameters), set(m._forward_hooks), set(m._backward_hooks), set(m._forward_pre_hooks))
        for m in model.modules()
    }
    try:
        yield
    finally:
        for m, (params, fwd, bwd, pre) in before.items():
            for key in [k for k in m._parameters if k not in params]:
                del m._parameters[key]
            for store, keep in ((m._forward_hooks, fwd), (m._backward_hooks, bwd), (m._forward_pre_hooks, pre)):
                for hook_id in [k for k in store if k not in keep]:
                    del store[hook_id]


def deep_explainer_problems(model: nn.Module, example: Tensor | None = None) -> list[str]:
    """Reasons ``shap.DeepExplainer`` cannot explain ``model`` correctly (empty list: no problem found).

    Without ``example`` only the module tree is inspected (in-place activations); with an example input one forward
    pass also finds modules called more than once and called leaf modules whose type shap does not handle.
    """
    problems = [f"{n or type(model).__name__} is in-place" for n, m in model.named_modules() if getattr(m, "inplace", False)]
    if example is None:
        return problems
    deep = require("shap.explainers._deep.deep_pytorch", "interpret", "SHAP DeepExplainer")
    calls: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:  # a leaf, where shap puts its hooks

            def hook(_m: nn.Module, _i: Any, _o: Any, name: str = name) -> None:
                calls[name] = calls.get(name, 0) + 1

            handles.append(module.register_forward_hook(hook))
    try:
        with gradients_enabled(model), torch.no_grad():
            model(usable_tensor(example)[:1])
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    for name, count in calls.items():
        kind = type(modules[name]).__name__
        handler = deep.op_handler.get(kind)
        if handler is None:
            problems.append(f"{name} ({kind}) is a layer type shap's DeepExplainer does not handle")
        elif count > 1 and handler.__name__ in ("nonlinear_1d", "maxpool"):
            # shap keeps one (input, output) pair per module for its multipliers: a second call overwrites it
            problems.append(f"{name} ({kind}) is called {count} times per forward (reused non-linearity)")
    return problems


def shap_attributions(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | Sequence[int] | int,
    background: Tensor,
    explainer: Explainer = "gradient",
    nsamples: int = 200,
    seed: int = 0,
) -> tuple[Tensor, str]:
    """SHAP values of the ``target`` logit of each input against ``background``: ``(values, explainer_used)``.

    ``explainer``: ``"gradient"`` (``shap.GradientExplainer``, expected gradients with ``nsamples`` samples),
    ``"deep"`` (``shap.DeepExplainer``; raises ValueError when :func:`deep_explainer_problems` finds a problem or
    shap's additivity check fails) or ``"auto"`` (Deep where the model allows, else Gradient with a warning).
    For DeepExplainer the values sum to ``f(x) - mean(f(background))``.
    """
    shap = require("shap", "interpret", "shap_attributions")
    check_choice("explainer", explainer, EXPLAINERS)
    check_positive("nsamples", nsamples, integer=True)
    targets = _target_list(target, len(inputs))
    used = "gradient" if explainer == "gradient" else "deep"
    if used == "deep":
        problems = deep_explainer_problems(model, background)
        if problems:
            if explainer == "deep":
                raise ValueError(f"shap.DeepExplainer cannot explain this model correctly: {problems}. Use "
                                 "explainer='gradient' (or 'auto').")
            rank_zero_warn(f"SHAP: DeepExplainer not usable ({problems}); falling back to GradientExplainer.")
            used = "gradient"
    # shap reseeds numpy's global RNG: its draws come from a private stream, the caller's RNG state is put back
    with gradients_enabled(model), _no_leftovers(model), private_rng(seed, inputs.device):
        x = usable_tensor(inputs)
        bg = usable_tensor(background).to(x.device)
        values = torch.zeros_like(x)
        for cls in sorted(set(targets)):
            rows = [i for i, t in enumerate(targets) if t == cls]
            wrapped = _SelectOutput(model, cls)
            if used == "deep":
                try:
                    phi = shap.DeepExplainer(wrapped, bg).shap_values(x[rows], check_additivity=True)
                except AssertionError as err:
                    if explainer == "deep":
                        raise ValueError(f"shap.DeepExplainer failed its additivity check on this model ({err}); "
                                         "use explainer='gradient' (or 'auto').") from None
                    rank_zero_warn(f"SHAP: DeepExplainer failed its additivity check ({str(err)[:120]}...); falling "
                                   "back to GradientExplainer.")
                    return shap_attributions(model, inputs, target, background, "gradient", nsamples, seed)
            else:
                phi = shap.GradientExplainer(wrapped, bg, batch_size=64).shap_values(x[rows], nsamples=nsamples, rseed=seed)
            phi = np.asarray(phi[0] if isinstance(phi, list) else phi)
            if phi.ndim == x.ndim + 1:  # trailing output axis (one output)
                phi = phi[..., 0]
            values[rows] = torch.as_tensor(phi, dtype=x.dtype, device=x.device)
    return values, used


def superpixel_mask(shape: Sequence[int], size: int) -> Tensor:
    """Feature mask for LIME: ``[C, H, W]`` images get ``size x size`` grid superpixels shared by all channels
    (ids 0..n-1); other shapes get one id per element."""
    check_positive("superpixel_size", size, integer=True)
    shape = tuple(shape)
    if len(shape) == 3:
        c, h, w = shape
        rows = torch.arange(h) // size
        cols = torch.arange(w) // size
        ids = rows[:, None] * ((w + size - 1) // size) + cols[None, :]
        return ids.expand(c, h, w).clone()
    return torch.arange(int(np.prod(shape))).reshape(shape)


def lime_attributions(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | Sequence[int] | int,
    feature_mask: Tensor | None = None,
    superpixel_size: int = 2,
    n_samples: int = 200,
    baseline: float = 0.0,
    alpha: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """LIME (Ribeiro et al. 2016) through Captum's ``Lime``: a linear model of the target logit fitted on
    ``n_samples`` random on/off perturbations of the superpixels (off = ``baseline``), weighted by proximity.
    ``alpha = 0``: weighted least squares (scale-free: works for a barely trained model whose logits hardly move);
    ``alpha > 0``: Lasso with that penalty (sparse, the paper's K-LASSO flavour; the penalty is in logit units, so
    too large a value zeroes every coefficient). Returns per-element attributions (each element carries its
    superpixel's coefficient)."""
    attr = require("captum.attr", "interpret", "lime_attributions")
    linear = require("captum._utils.models.linear_model", "interpret", "lime_attributions")
    require("sklearn", "interpret", "lime_attributions")
    check_positive("n_samples", n_samples, integer=True)
    targets = _target_list(target, len(inputs))
    # the perturbations are drawn from a private seeded stream; the caller's global RNG state is put back
    with gradients_enabled(model), torch.no_grad(), private_rng(seed, inputs.device):
        x = usable_tensor(inputs)
        mask = (feature_mask if feature_mask is not None else superpixel_mask(x.shape[1:], superpixel_size)).to(x.device)
        surrogate = linear.SkLearnLasso(alpha=alpha) if alpha > 0 else linear.SkLearnLinearRegression()
        explainer = attr.Lime(model, interpretable_model=surrogate)
        out = []
        for i in range(len(x)):
            out.append(
                explainer.attribute(
                    x[i : i + 1], baselines=_baseline_like(x[i : i + 1], baseline), target=targets[i],
                    feature_mask=mask[None], n_samples=n_samples, perturbations_per_eval=min(n_samples, 64),
                )
            )
    return torch.cat(out).detach()


# ----------------------------------------------------------------------------------------------------------------
# loggers
# ----------------------------------------------------------------------------------------------------------------


def _train_dataset(trainer: Any) -> tuple[Any, Any]:
    loader = _first_loader(trainer.train_dataloader)
    if loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "train_dataloader"):
        loader = trainer.datamodule.train_dataloader()
    if loader is None or not hasattr(getattr(loader, "dataset", None), "__getitem__"):
        raise RuntimeError("SHAPLogger needs a map-style training dataset for its background set (none found).")
    return loader.dataset, getattr(loader, "collate_fn", None) or torch.utils.data.default_collate


class SHAPLogger(AttributionLogger):
    """Logs SHAP values of a fixed set of samples, against a background set drawn from the training data.

    Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions", NeurIPS 2017 (the ``shap`` package).
    ``explainer="gradient"`` (default) uses ``shap.GradientExplainer`` (expected gradients); ``"deep"`` uses
    ``shap.DeepExplainer`` and refuses, clearly, a model it would get wrong (in-place / reused activations, layer
    types shap does not handle, failed additivity); ``"auto"`` uses Deep where the model allows and falls back to
    Gradient with a warning. The background is ``background_size`` training samples picked once (seeded), their
    indices kept in the callback state.

    Args:
        explainer: ``"gradient"``, ``"deep"`` or ``"auto"``.
        background_size: number of training samples in the background set.
        nsamples: GradientExplainer samples per explained input.
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`~lightning_techniques.interpret.attribution.AttributionLogger`.

    Example::

        trainer = L.Trainer(callbacks=[SHAPLogger(background_size=64, every_n_val_epochs=5)])

    Limits: single-tensor inputs; DeepExplainer cannot see functional non-linearities (``F.relu``) except through
    its additivity check; rank 0 only under DDP; FSDP/DeepSpeed refused.
    """

    method_name = "shap"
    default_every_n_val_epochs = 40

    def __init__(self, explainer: Explainer = "gradient", background_size: int = 64, nsamples: int = 200,
                 every_n_val_epochs: int | None = None, selection: Selection = "per_class", samples_per_class: int = 1,
                 max_samples: int = 10, explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0,
                 name: str | None = None, input_key: str | int | None = None,
                 target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        check_choice("explainer", explainer, EXPLAINERS)
        check_positive("background_size", background_size, integer=True)
        check_positive("nsamples", nsamples, integer=True)
        require("shap", "interpret", "SHAPLogger")
        self.explainer = explainer
        self.background_size = background_size
        self.nsamples = nsamples
        self.explainer_used: str | None = None

    def check_model(self, trainer: Any, pl_module: Any) -> None:
        if self.explainer == "deep":
            problems = deep_explainer_problems(pl_module)
            if problems:
                raise ValueError(f"SHAPLogger(explainer='deep'): shap.DeepExplainer cannot explain this model "
                                 f"correctly: {problems}. Use explainer='gradient' or 'auto'.")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # explainer="deep": the forward-pass checks (reused / unsupported layers) need data, which exists from here
        # on - still before the first step. Every rank checks locally (no collective), so all ranks raise alike.
        if self.explainer == "deep":
            problems = deep_explainer_problems(pl_module, self.background(trainer, "val")[:1])
            if problems:
                raise ValueError(f"SHAPLogger(explainer='deep'): shap.DeepExplainer cannot explain this model "
                                 f"correctly: {problems}. Use explainer='gradient' or 'auto'.")

    def background(self, trainer: Any, stage: str = "val") -> Tensor:
        """The background inputs (picked once from the training set; indices in ``self.indices['background']``), as
        the model sees inputs in ``stage`` (``"val"`` / ``"test"``, the stage being explained): through that stage's
        batch-transfer hooks, so a normalisation or a user's ``on_after_batch_transfer`` applies to the background
        exactly as to the explained samples (training-only augmentation does not)."""
        dataset, collate = _train_dataset(trainer)
        if self.indices.get("background") is None:
            generator = torch.Generator().manual_seed(self.seed)
            count = min(self.background_size, len(dataset))
            self.indices["background"] = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        inputs, _, _ = self._fetch(trainer, dataset, collate, self.indices["background"] or [], stage)
        return inputs

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        values, used = shap_attributions(model, inputs, target, self.background(trainer, self.event_stage),
                                         self.explainer, self.nsamples, self.seed)
        self.explainer_used = used
        return values, {"explainer": used}


class LIMELogger(AttributionLogger):
    """Logs LIME superpixel attributions of a fixed set of samples (Captum's ``Lime`` with a feature mask).

    Ribeiro, Singh & Guestrin, "'Why Should I Trust You?': Explaining the Predictions of Any Classifier", KDD 2016.
    Images are cut into ``superpixel_size x superpixel_size`` grid superpixels (flat inputs: one feature each);
    ``n_samples`` random on/off perturbations (off = ``baseline``) are scored by the model and a linear model (least
    squares, or a Lasso when ``alpha > 0``) fitted to the explained logit, weighted by similarity to the original. Perturbations come from a private seeded
    RNG: the training run's random stream is untouched.

    Args:
        superpixel_size: grid cell size in pixels (images).
        n_samples: perturbations per explained sample.
        baseline: value of a switched-off superpixel.
        alpha: Lasso penalty of the interpretable model (0: plain weighted least squares).
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`~lightning_techniques.interpret.attribution.AttributionLogger`.

    Example::

        trainer = L.Trainer(callbacks=[LIMELogger(superpixel_size=2, n_samples=300, every_n_val_epochs=10)])

    Limits: model-agnostic but costs ``n_samples`` forwards per sample; grid superpixels (no image segmentation);
    rank 0 only under DDP; FSDP/DeepSpeed refused.
    """

    method_name = "lime"
    default_every_n_val_epochs = 50

    def __init__(self, superpixel_size: int = 2, n_samples: int = 200, baseline: float = 0.0, alpha: float = 0.0,
                 every_n_val_epochs: int | None = None, selection: Selection = "per_class", samples_per_class: int = 1,
                 max_samples: int = 10, explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0,
                 name: str | None = None, input_key: str | int | None = None,
                 target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        check_positive("superpixel_size", superpixel_size, integer=True)
        check_positive("n_samples", n_samples, integer=True)
        check_number("baseline", baseline)
        check_number("alpha", alpha, low=0.0)
        require("captum.attr", "interpret", "LIMELogger")
        require("sklearn", "interpret", "LIMELogger")
        self.superpixel_size = superpixel_size
        self.n_samples = n_samples
        self.baseline = baseline
        self.alpha = alpha

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        values = lime_attributions(model, inputs, target, superpixel_size=self.superpixel_size,
                                   n_samples=self.n_samples, baseline=self.baseline, alpha=self.alpha, seed=self.seed)
        return values, {}
