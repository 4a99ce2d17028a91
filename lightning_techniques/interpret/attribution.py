"""Attribution loggers: the shared base class, plus saliency, Integrated Gradients and DeepLIFT.

Functional core (plain torch + Captum, no Lightning):

* :func:`saliency_map` - Simonyan, Vedaldi & Zisserman 2014: ``|d f_c / d x|``.
* :func:`integrated_gradients` - Sundararajan, Taly & Yan 2017, with the completeness check
  (:func:`completeness_report`: attributions sum to ``f(x) - f(baseline)``).
* :func:`deeplift` - Shrikumar, Greenside & Kundaje 2017 (Rescale rule, through Captum's ``DeepLift``).
* :func:`attribution_heatmap`, :func:`mass_fraction`, :func:`plot_attributions` (:func:`overlay_grid`: a cheap
  unlabelled image) - turning attributions into per-pixel maps, measuring where their mass is, drawing them over
  the inputs with the true class, prediction and confidence of each sample and a colorbar.

Lightning adapter: :class:`AttributionLogger` is the ONE base class of every attribution logger (this module's
and those in :mod:`.gradcam` and :mod:`.shap_lime`). It chooses a fixed set of samples once (per class, or the
most confidently wrong), logs every ``every_n_val_epochs`` validation runs and at test end, on global rank 0 only, with
the unwrapped ``trainer.lightning_module`` (no DDP forward, no collective), inside
:func:`~lightning_techniques._internal.eval_grad.gradients_enabled` (so it works under Lightning's
``inference_mode`` evaluation and restores train/eval modes and ``requires_grad`` flags), with the global RNGs
untouched (stochastic methods draw from a private, seeded stream), and writes overlays (PNG images) and raw arrays
(``.npy``) through the shared :class:`~lightning_techniques._internal.artifacts.ArtifactLogger`. Subclasses only
implement :meth:`AttributionLogger.attribute`.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_techniques._internal import compat
from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.eval_grad import gradients_enabled, usable_tensor
from lightning_techniques._internal.eval_stages import fetch_samples
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.step_logging import check_log_flag
from lightning_techniques._internal.validation import check_choice, check_number, check_positive

Selection = Literal["per_class", "confident_wrong"]
SELECTIONS = ("per_class", "confident_wrong")
_LOOP_STAGE = {"val": "validate", "test": "test"}
Explain = Literal["prediction", "label"]
EXPLAIN = ("prediction", "label")

# ----------------------------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------------------------


def _captum_attr(feature: str) -> Any:
    return require("captum.attr", "interpret", feature)


def _target_list(target: Tensor | Sequence[int] | int, n: int) -> list[int]:
    if isinstance(target, int):
        return [target] * n
    values = [int(t) for t in (target.tolist() if isinstance(target, Tensor) else target)]
    if len(values) != n:
        raise ValueError(f"target has {len(values)} entries for {n} inputs.")
    return values


def _baseline_like(inputs: Tensor, baseline: float | Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        return usable_tensor(baseline).to(inputs.device, inputs.dtype).expand_as(inputs).contiguous()
    return torch.full_like(inputs, float(baseline))


def saliency_map(model: nn.Module, inputs: Tensor, target: Tensor | Sequence[int] | int) -> Tensor:
    """Vanilla-gradient saliency (Simonyan et al. 2014): ``|d logit_target / d inputs|``, same shape as ``inputs``.

    Works inside ``torch.inference_mode`` (Lightning's evaluation); the model's modes and flags are restored.
    """
    attr = _captum_attr("saliency_map")
    with gradients_enabled(model):
        x = usable_tensor(inputs).requires_grad_()
        return attr.Saliency(model).attribute(x, target=_target_list(target, len(x)), abs=True).detach()


def integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    target: Tensor | Sequence[int] | int,
    baseline: float | Tensor = 0.0,
    n_steps: int = 50,
    method: str = "gausslegendre",
) -> tuple[Tensor, Tensor]:
    """Integrated Gradients (Sundararajan et al. 2017) through Captum: ``(attributions, convergence_delta)``.

    ``convergence_delta[i] = sum(attributions[i]) - (f(x_i) - f(baseline))`` for the target logit: the completeness
    axiom says it is 0; its size measures the error of the ``n_steps`` path integral.
    """
    attr = _captum_attr("integrated_gradients")
    check_positive("n_steps", n_steps, integer=True)
    with gradients_enabled(model):
        x = usable_tensor(inputs)
        attributions, delta = attr.IntegratedGradients(model).attribute(
            x,
            baselines=_baseline_like(x, baseline),
            target=_target_list(target, len(x)),
            n_steps=n_steps,
            method=method,
            return_convergence_delta=True,
        )
    return attributions.detach(), delta.detach()


@contextmanager
def _separate_chained_nonlinearities(model: nn.Module, kinds: Any) -> Iterator[None]:
    """Give every module of Captum's DeepLIFT non-linear ``kinds`` a copy of its input for the duration.

    Why (Captum 0.9, found on the demo CNN, gaps up to 40% per sample): Captum captures a non-linear module's output
    gradient with a hook on its output tensor and replaces the next module's input gradient (its Rescale
    multiplier) with a hook on its input tensor. When one such module feeds another directly (``nn.ReLU`` ->
    ``nn.MaxPool2d``, ``nn.MaxPool2d`` -> ``nn.ReLU``, ``nn.ReLU`` -> ``nn.Sigmoid``) both hooks sit on the same
    tensor and the capture runs first, so the first module sees the plain gradient instead of the multiplier and
    summation-to-delta fails. A forward pre-hook (registered before Captum's) that hands the module a clone of its
    input puts a node between the two hooks; the forward values are unchanged."""
    handles = []

    def clone_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.clone() if isinstance(a, Tensor) else a for a in args)

    try:
        for module in model.modules():
            if type(module) in kinds:
                handles.append(module.register_forward_pre_hook(clone_input))
        yield
    finally:
        for handle in handles:
            handle.remove()


def deeplift(
    model: nn.Module, inputs: Tensor, target: Tensor | Sequence[int] | int, baseline: float | Tensor = 0.0
) -> tuple[Tensor, Tensor]:
    """DeepLIFT (Shrikumar et al. 2017, Rescale rule) through Captum: ``(attributions, convergence_delta)``.

    Summation-to-delta holds (up to float error) for networks whose non-linearities are ``nn.Module`` instances
    of a kind Captum handles (``nn.ReLU``, ``nn.MaxPool2d``, ``nn.Sigmoid`` ...), each called once per forward,
    also where one feeds another directly (``nn.ReLU`` -> ``nn.MaxPool2d``: Captum gets that wrong on its own; see
    :func:`_separate_chained_nonlinearities`). Functional calls (``F.relu``, ``torch.max``) get plain gradients and
    the delta grows - :func:`completeness_report` measures it per sample.
    """
    attr = _captum_attr("deeplift")
    kinds = require("captum.attr._core.deep_lift", "interpret", "deeplift").SUPPORTED_NON_LINEAR
    with gradients_enabled(model), warnings.catch_warnings(), _separate_chained_nonlinearities(model, kinds):
        # Captum announces on every call that it hooks the activations (and removes the hooks afterwards)
        warnings.filterwarnings("ignore", message="Setting forward, backward hooks and attributes")
        x = usable_tensor(inputs).requires_grad_()
        attributions, delta = attr.DeepLift(model).attribute(
            x, baselines=_baseline_like(x, baseline), target=_target_list(target, len(x)), return_convergence_delta=True
        )
    return attributions.detach(), delta.detach()


@torch.no_grad()
def completeness_report(
    model: nn.Module,
    inputs: Tensor,
    attributions: Tensor,
    target: Tensor | Sequence[int] | int,
    baseline: float | Tensor = 0.0,
) -> dict[str, Tensor]:
    """The completeness check of IG / DeepLIFT, computed independently of Captum's delta.

    Returns per-sample tensors ``attribution_sum``, ``output_difference`` (``f(x) - f(baseline)`` of the target
    logit), ``gap`` (absolute difference) and ``relative_gap`` (``gap / max(|output_difference|, 1e-6)``).
    """
    with gradients_enabled(model):
        x = usable_tensor(inputs)
        idx = torch.tensor(_target_list(target, len(x)), device=x.device)
        fx = model(x).gather(1, idx[:, None])[:, 0]
        fb = model(_baseline_like(x, baseline)).gather(1, idx[:, None])[:, 0]
    diff = (fx - fb).double().cpu()
    total = attributions.detach().double().flatten(1).sum(1).cpu()
    gap = (total - diff).abs()
    return {"attribution_sum": total, "output_difference": diff, "gap": gap, "relative_gap": gap / diff.abs().clamp_min(1e-6)}


def attribution_heatmap(attributions: Tensor) -> Tensor:
    """Per-location magnitude of an attribution: ``[B, C, H, W] -> [B, H, W]`` (sum of ``|a|`` over channels);
    other shapes -> ``[B, features]`` of ``|a|``."""
    a = attributions.detach().abs().float()
    if a.ndim == 4:
        return a.sum(1)
    return a.flatten(1)


def mass_fraction(attributions: Tensor, mask: Tensor) -> Tensor:
    """Fraction of the attribution mass (``sum |a|``) that lies inside ``mask`` (bool, ``[H, W]`` or ``[B, H, W]``
    for images, ``[F]`` / ``[B, F]`` for flat inputs), per sample. Compare with the mask's area fraction."""
    heat = attribution_heatmap(attributions)
    mask = mask.to(heat.device).bool().expand_as(heat)
    total = heat.flatten(1).sum(1).clamp_min(1e-12)
    return (heat * mask).flatten(1).sum(1) / total


def overlay_grid(inputs: Tensor, attributions: Tensor, alpha: float = 0.55, min_size: int = 64) -> np.ndarray:
    """An RGB ``uint8`` image: for image inputs ``[B, C, H, W]`` a row of inputs over a row of heatmap overlays
    (attribution magnitude, upsampled to the input when coarser, e.g. Grad-CAM; matplotlib's ``jet`` colormap);
    for other inputs a ``samples x features`` map of the signed attributions (``coolwarm``). Small inputs are
    enlarged (nearest) to at least ``min_size`` pixels. Cheap: no figure is drawn."""
    require("matplotlib", "interpret", "attribution overlays")
    from matplotlib import colormaps

    inputs = inputs.detach().float().cpu()
    attributions = attributions.detach().float().cpu()
    if inputs.ndim != 4:
        flat = attributions.flatten(1)
        bound = float(flat.abs().max()) or 1.0
        rgb = colormaps["coolwarm"](((flat / bound + 1) / 2).numpy())[..., :3]
        scale = max(1, min_size // max(min(flat.shape), 1))
        return (np.kron(rgb, np.ones((scale, scale, 1))) * 255).round().astype(np.uint8)
    heat = attribution_heatmap(attributions)
    if heat.shape[-2:] != inputs.shape[-2:]:
        heat = torch.nn.functional.interpolate(heat[:, None], size=inputs.shape[-2:], mode="bilinear")[:, 0]
    heat = heat / heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    lo = inputs.flatten(1).amin(1)[:, None, None, None]
    hi = inputs.flatten(1).amax(1)[:, None, None, None]
    img = (inputs - lo) / (hi - lo).clamp_min(1e-12)
    img = img.expand(-1, 3, -1, -1) if img.shape[1] != 3 else img
    img_np = img.permute(0, 2, 3, 1).numpy()
    colored = colormaps["jet"](heat.numpy())[..., :3]
    blended = (1 - alpha) * img_np + alpha * colored
    n, h, w, _ = img_np.shape
    scale = max(1, -(-min_size // max(h, w)))
    pad = 2
    grid = np.ones((2 * h * scale + 3 * pad, n * (w * scale + pad) + pad, 3))
    for i in range(n):
        x0 = pad + i * (w * scale + pad)
        for row, tile in enumerate((img_np[i], blended[i])):
            y0 = pad + row * (h * scale + pad)
            grid[y0 : y0 + h * scale, x0 : x0 + w * scale] = np.kron(tile, np.ones((scale, scale, 1)))
    return (grid.clip(0, 1) * 255).round().astype(np.uint8)


def _class_name(index: int, class_names: Sequence[str] | None) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else str(index)


def plot_attributions(
    inputs: Tensor,
    attributions: Tensor,
    labels: Tensor | Sequence[int],
    predictions: Tensor | Sequence[int],
    confidences: Tensor | Sequence[float],
    class_names: Sequence[str] | None = None,
    title: str = "",
    columns: int = 8,
) -> Any:
    """A matplotlib Figure a reader can read on its own: for image inputs ``[B, C, H, W]``, per sample the input
    and below it the attribution magnitude over it (``jet``; coarser maps such as Grad-CAM upsampled), each titled
    with the true class, the prediction and its confidence (red when wrong), ``columns`` samples a row, one colorbar
    (magnitude as a fraction of the sample's largest); for other inputs a samples x features map of the signed
    attributions (``coolwarm``, symmetric) with the same labels per row and a colorbar."""
    figure_mod = require("matplotlib.figure", "interpret", "attribution figures")
    inputs = inputs.detach().float().cpu()
    attributions = attributions.detach().float().cpu()
    labels = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    predictions = [int(v) for v in (predictions.tolist() if isinstance(predictions, Tensor) else predictions)]
    confidences = [float(v) for v in (confidences.tolist() if isinstance(confidences, Tensor) else confidences)]
    n = len(labels)

    def caption(i: int) -> str:
        return (f"true {_class_name(labels[i], class_names)}\npred {_class_name(predictions[i], class_names)} "
                f"({confidences[i]:.0%})")

    if inputs.ndim != 4:
        flat = attributions.flatten(1).numpy()
        bound = float(np.abs(flat).max()) or 1.0
        fig = figure_mod.Figure(figsize=(min(4.0 + 0.18 * flat.shape[1], 16.0), 1.2 + 0.4 * n), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        im = ax.imshow(flat, cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(n), [caption(i).replace("\n", " / ") for i in range(n)], fontsize=8)
        for tick, i in zip(ax.get_yticklabels(), range(n)):
            tick.set_color("tab:red" if labels[i] != predictions[i] else "black")
        ax.set_xlabel("input feature")
        ax.set_ylabel("sample")
        fig.colorbar(im, ax=ax, label="attribution (signed)")
        ax.set_title(title or "attributions")
        return fig
    # one composited image per row of samples (overlay_grid) in one axes each: drawing ~40 small axes costs
    # seconds a figure on a busy CPU, this a fraction of that
    mpl = require("matplotlib", "interpret", "attribution figures")
    cols = max(1, min(columns, n))
    blocks = -(-n // cols)
    h, w = inputs.shape[-2:]
    # small tiles (matplotlib enlarges them): rendering a pre-enlarged grid costs several times more
    min_size = 16
    scale, pad = max(1, -(-min_size // max(h, w))), 2
    fig = figure_mod.Figure(figsize=(1.25 * cols + 1.6, 2.9 * blocks + 0.4))
    fig.subplots_adjust(left=0.07, right=0.86, top=1 - 0.75 / (3.3 * blocks + 0.4), bottom=0.03,
                        hspace=0.45)
    for b in range(blocks):
        rows = range(b * cols, min(n, (b + 1) * cols))
        grid = overlay_grid(inputs[rows.start : rows.stop], attributions[rows.start : rows.stop], min_size=min_size)
        ax = fig.add_subplot(blocks, 1, b + 1)
        ax.imshow(grid, interpolation="nearest")
        centres = [pad + i * (w * scale + pad) + w * scale / 2 for i in range(len(rows))]
        ax.set_xlim(-0.5, cols * (w * scale + pad) + pad - 0.5)
        ax.xaxis.tick_top()
        ax.set_xticks(centres, [caption(i) for i in rows], fontsize=8)
        for tick, i in zip(ax.get_xticklabels(), rows):
            tick.set_color("tab:red" if labels[i] != predictions[i] else "black")
        ax.set_yticks([pad + h * scale / 2, 2 * pad + 1.5 * h * scale], ["input", "attribution"], fontsize=8)
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    cax = fig.add_axes((0.89, 0.15, 0.018, 0.7))
    mappable = mpl.cm.ScalarMappable(norm=mpl.colors.Normalize(0.0, 1.0), cmap="jet")
    fig.colorbar(mappable, cax=cax, label="|attribution| / sample max")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


@contextmanager
def private_rng(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Seed torch / numpy / random with ``seed`` inside the context and put every global RNG state back afterwards,
    so a (stochastic) attribution neither depends on nor changes the training run's random stream."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


# ----------------------------------------------------------------------------------------------------------------
# sample selection (functional)
# ----------------------------------------------------------------------------------------------------------------


def class_labels(targets: Tensor) -> Tensor:
    """Hard class labels of a target tensor (``[B]`` ints, or ``[B, C]`` soft / one-hot -> argmax)."""
    return targets.argmax(dim=1) if targets.ndim > 1 else targets.long()


def select_per_class(labels: Tensor, per_class: int, max_samples: int, seed: int) -> list[int]:
    """Indices of ``per_class`` samples of every class (a seeded pick), classes in ascending order, at most
    ``max_samples`` in all."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    chosen: dict[int, list[int]] = {}
    for i in order.tolist():
        c = int(labels[i])
        chosen.setdefault(c, [])
        if len(chosen[c]) < per_class:
            chosen[c].append(i)
    picked = [i for c in sorted(chosen) for i in chosen[c]]
    return picked[:max_samples]


def select_confident_wrong(probabilities: Tensor, labels: Tensor, num: int) -> list[int]:
    """Indices of the ``num`` most confidently wrong samples (highest probability on a wrong class), topped up by
    the correct samples with the smallest margin when fewer are wrong."""
    pred_prob, pred = probabilities.max(dim=1)
    wrong = pred != labels
    true_prob = probabilities.gather(1, labels[:, None])[:, 0]
    # wrong: rank by confidence in the wrong class (1 + p so they come first); right: by smallest margin
    others = probabilities.clone()
    others.scatter_(1, labels[:, None], -1.0)
    margin = true_prob - others.max(dim=1).values
    score = torch.where(wrong, 1.0 + pred_prob, -margin)
    return torch.argsort(score, descending=True, stable=True)[:num].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Lightning adapter: the one base class
# ----------------------------------------------------------------------------------------------------------------


def _first_loader(loaders: Any) -> Any:
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def resolve_every_n_val_epochs(owner: str, every_n_val_epochs: int | None, every_n_epochs: int | None,
                               default: int) -> int:
    """The logging period from ``every_n_val_epochs`` and its deprecated old name ``every_n_epochs`` (a
    ``FutureWarning`` names the new one; giving both is a ``ValueError``); ``default`` when neither is given."""
    if every_n_epochs is not None:
        if every_n_val_epochs is not None:
            raise ValueError(
                f"{owner}: got every_n_val_epochs={every_n_val_epochs!r} and every_n_epochs={every_n_epochs!r}; "
                "every_n_epochs is the deprecated old name of every_n_val_epochs - pass only every_n_val_epochs."
            )
        warnings.warn(
            f"{owner}(every_n_epochs=...) is deprecated and will be removed; use every_n_val_epochs={every_n_epochs!r} "
            "(same meaning: log every N-th validation run), the name every evaluation logger uses.",
            FutureWarning,
            stacklevel=4,
        )
        return every_n_epochs
    return default if every_n_val_epochs is None else every_n_val_epochs


class AttributionLogger(LeanHooks, Callback):
    """Base class of every attribution logger: fixed samples, frequency, rank 0 only, overlays + raw arrays.

    Not used directly: subclasses (:class:`SaliencyLogger`, :class:`IntegratedGradientsLogger`,
    :class:`DeepLiftLogger`, ``GradCAMLogger``, ``SHAPLogger``, ``LIMELogger``) implement :meth:`attribute`.

    What every subclass does:

    * **Samples**: chosen once from the validation set (``selection="per_class"``: ``samples_per_class`` of every
      class by a ``seed``-ed pick; ``"confident_wrong"``: the ``max_samples`` most confidently misclassified,
      computed with the model of the first logging event), by dataset index, kept in the callback state (a resumed
      run uses the same samples). At test end a set is chosen the same way from the test set. The samples (and
      SHAP's background) are passed through the stage's batch-transfer hooks exactly as Lightning's loop passes a
      batch (``on_before_batch_transfer``, device transfer, ``on_after_batch_transfer`` of the module or
      datamodule, this package's normalisation and other batch transforms): the maps explain the inputs the
      model really sees in that stage.
    * **When**: every ``every_n_val_epochs``-th validation run (sanity checking excluded) and at the end of
      ``trainer.test`` (``log_on_test``).
    * **Where**: global rank 0 only, on the unwrapped ``trainer.lightning_module``; other ranks do nothing and wait
      for nothing (no collective is involved).
    * **What**: ``<name>/<stage>/overlay`` (a figure, :func:`plot_attributions`: each input over its heatmap,
      titled with true class, prediction and confidence, with a colorbar; columns in the samples table's order), ``<name>/<stage>/attributions``, ``/inputs`` (as the model saw them) and ``/raw_inputs`` (as the
      loader yielded them, for display) (``.npy``), ``<name>/<stage>/samples`` (table: dataset
      index, label, prediction, explained class), plus what the method adds (IG: the completeness table), through
      the shared artefact logger; numeric summaries as metrics to the attached loggers; a short summary per event in
      ``self.history`` (checkpointed) and the latest arrays in ``self.last``.

    Each subclass's default ``every_n_val_epochs`` keeps the logging cost under 10% of the demo's training time
    (measured by ``benchmarks/attribution_cost.py``): saliency 2, IG 5, DeepLIFT 2, Grad-CAM 2, SHAP 40, LIME 50.
    Those figures are for the bare overlay image (``figure=False``); the labelled figure (default) adds ~0.2-0.5 s
    of CPU per event, which matters for the cheap methods (saliency, Grad-CAM) on a tiny model.

    Args:
        every_n_val_epochs: log every N-th validation run (default: the subclass's, see above).
        selection: ``"per_class"`` or ``"confident_wrong"``.
        samples_per_class: samples per class for ``"per_class"``.
        max_samples: cap on the number of samples (the count for ``"confident_wrong"``).
        explain: explain the model's ``"prediction"`` or the true ``"label"``.
        log_on_test: also log at the end of ``trainer.test``.
        seed: seed of the sample pick and of stochastic methods (private RNG; training's RNG is untouched).
        name: artefact name prefix (default: the method's name).
        input_key / target_key: where input and target are in a dict/tuple batch.
        class_names: names of the classes for figure titles (default: class indices).
        figure: draw ``overlay`` as the labelled figure (:func:`plot_attributions`, ~0.2-0.5 s of CPU an event)
            or, with False, as a bare tiled PNG (:func:`overlay_grid`, ~0.01 s; no labels, no colorbar).
        every_n_epochs: deprecated old name of ``every_n_val_epochs`` (a ``FutureWarning``; not both).
        log: send the numeric summaries as metrics to the attached loggers (``False``: none; the artefacts are
            still written and ``self.history`` still kept).

    Limits: the module's ``forward`` must take the input tensor and return ``[B, num_classes]`` logits; the
    evaluation dataset must be map-style (indexable); FSDP/DeepSpeed are refused (sharded weights); under DDP the
    fixed samples go through the batch hooks on rank 0 alone, so a hook that communicates across ranks would wait.
    """

    takes_over: frozenset[str] = frozenset({"eval_hooks"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    method_name = "attribution"
    default_every_n_val_epochs = 1

    def __init__(
        self,
        every_n_val_epochs: int | None = None,
        selection: Selection = "per_class",
        samples_per_class: int = 1,
        max_samples: int = 10,
        explain: Explain = "prediction",
        log_on_test: bool = True,
        seed: int = 0,
        name: str | None = None,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        class_names: list[str] | None = None,
        figure: bool = True,
        every_n_epochs: int | None = None,
        log: bool = True,
    ) -> None:
        every_n_val_epochs = resolve_every_n_val_epochs(type(self).__name__, every_n_val_epochs, every_n_epochs,
                                                        self.default_every_n_val_epochs)
        check_positive("every_n_val_epochs", every_n_val_epochs, integer=True)
        check_choice("selection", selection, SELECTIONS)
        check_positive("samples_per_class", samples_per_class, integer=True)
        check_positive("max_samples", max_samples, integer=True)
        check_choice("explain", explain, EXPLAIN)
        check_number("seed", seed, low=0, integer=True)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(f"name must be a non-empty string or None, got {name!r}.")
        if class_names is not None and (isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)):
            raise TypeError(f"class_names must be a list of strings or None, got {class_names!r}.")
        require("matplotlib", "interpret", type(self).__name__)
        self.every_n_val_epochs = every_n_val_epochs
        self.selection = selection
        self.samples_per_class = samples_per_class
        self.max_samples = max_samples
        self.explain = explain
        self.log_on_test = log_on_test
        self.seed = seed
        self.name = name or self.method_name
        self.input_key = input_key
        self.target_key = target_key
        self.class_names = list(class_names) if class_names is not None else None
        self.figure = figure
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.indices: dict[str, list[int] | None] = {"val": None, "test": None}
        self.validation_runs = 0
        self.history: list[dict[str, Any]] = []
        self.event_stage = "val"  # the stage of the event being logged ("val" / "test")
        self.last: dict[str, Tensor] = {}  # the latest event's inputs / targets / attributions (rank 0), for users

    @property
    def every_n_epochs(self) -> int:
        """Deprecated name of :attr:`every_n_val_epochs` (read-only)."""
        warnings.warn(f"{type(self).__name__}.every_n_epochs is deprecated; read every_n_val_epochs.", FutureWarning,
                      stacklevel=2)
        return self.every_n_val_epochs

    @property
    def state_key(self) -> str:
        # several loggers of one class (different names) keep separate states in a checkpoint
        return self._generate_state_key(name=self.name)

    # ---------------------------------------------------------------- subclass interface
    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        """Attributions for ``inputs`` w.r.t. the ``target`` class indices, and a dict of summary numbers (may
        include ``"tables"``: ``{suffix: table}`` to log). Called inside gradients_enabled + a private RNG."""
        raise NotImplementedError

    def check_model(self, trainer: Any, pl_module: Any) -> None:
        """Subclass hook for misuse detected in ``setup`` (before the first step)."""

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if compat.shards_parameters(trainer.strategy):
            raise ValueError(
                f"{type(self).__name__} does not support {type(trainer.strategy).__name__}: rank 0 needs the whole "
                "model to attribute alone."
            )
        self.check_model(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.validation_runs += 1
        if self.validation_runs % self.every_n_val_epochs == 0:
            self._dataset_and_collate(trainer, "val")  # an unusable dataset fails on every rank alike (none waits)
            if trainer.is_global_zero:
                self.log_event(trainer, "val")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.log_on_test:
            self._dataset_and_collate(trainer, "test")
            if trainer.is_global_zero:
                self.log_event(trainer, "test")

    # ---------------------------------------------------------------- data
    def _dataset_and_collate(self, trainer: Any, stage: str) -> tuple[Any, Any]:
        loader = _first_loader(trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders)
        if loader is None:
            raise RuntimeError(f"{type(self).__name__}: no {stage} dataloader to take samples from.")
        dataset = getattr(loader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                f"{type(self).__name__} needs a map-style {stage} dataset (with __len__ and __getitem__) to pick "
                f"fixed samples; got {type(dataset).__name__}."
            )
        collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
        return dataset, collate

    def _fetch(self, trainer: Any, dataset: Any, collate: Any, indices: Sequence[int],
               stage: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(inputs, labels, raw_inputs)`` of ``dataset[indices]`` as the model sees them in ``stage`` (``"val"`` /
        ``"test"``): through the stage's batch-transfer hooks (the shared
        :func:`~lightning_techniques._internal.eval_stages.fetch_samples`); ``raw_inputs`` are the loader's
        inputs before any hook (None when a hook changed the batch's structure)."""
        device = trainer.lightning_module.device
        raw, batch = fetch_samples(trainer, dataset, indices, _LOOP_STAGE[stage], collate)
        inputs = usable_tensor(get_inputs(batch, self.input_key)).to(device)
        labels = class_labels(usable_tensor(get_targets(batch, self.target_key))).to(device)
        try:
            raw_inputs: Tensor | None = usable_tensor(get_inputs(raw, self.input_key)).cpu()
        except (KeyError, IndexError, TypeError, ValueError):
            raw_inputs = None
        return inputs, labels, raw_inputs

    def _all_labels(self, dataset: Any, collate: Any) -> Tensor:
        targets = getattr(dataset, "targets", None)
        if isinstance(targets, (Tensor, np.ndarray, list)) and len(targets) == len(dataset):
            return class_labels(torch.as_tensor(targets))
        labels = []
        for start in range(0, len(dataset), 256):
            batch = collate([dataset[i] for i in range(start, min(start + 256, len(dataset)))])
            labels.append(class_labels(get_targets(batch, self.target_key)))
        return torch.cat(labels).cpu()

    def _select(self, trainer: Any, model: nn.Module, dataset: Any, collate: Any, stage: str) -> list[int]:
        if self.selection == "per_class":
            return select_per_class(self._all_labels(dataset, collate), self.samples_per_class, self.max_samples, self.seed)
        probs, labels = [], []
        with torch.no_grad():
            for start in range(0, len(dataset), 256):
                x, y, _ = self._fetch(trainer, dataset, collate, range(start, min(start + 256, len(dataset))), stage)
                probs.append(model(x).float().softmax(dim=1).cpu())
                labels.append(y.cpu())
        return select_confident_wrong(torch.cat(probs), torch.cat(labels), self.max_samples)

    # ---------------------------------------------------------------- the logging event
    def log_event(self, trainer: Any, stage: str) -> dict[str, Any]:
        """Compute and log the attributions of the fixed ``stage`` samples now (rank 0)."""
        model = trainer.lightning_module  # unwrapped: no DDP forward, no collective
        device = model.device
        dataset, collate = self._dataset_and_collate(trainer, stage)
        self.event_stage = stage
        with gradients_enabled(model), private_rng(self.seed, device):
            if self.indices.get(stage) is None:
                with torch.no_grad():
                    self.indices[stage] = self._select(trainer, model, dataset, collate, stage)
            indices = list(self.indices[stage] or [])
            # the samples as the model sees them in this stage (normalisation, user hooks ...), not dataset[i]
            inputs, labels, raw_inputs = self._fetch(trainer, dataset, collate, indices, stage)
            with torch.no_grad():
                logits = model(inputs).float()
            preds = logits.argmax(dim=1)
            explained = preds if self.explain == "prediction" else labels
            attributions, summary = self.attribute(model, inputs, explained, trainer)
        tables = summary.pop("tables", {})
        step = int(trainer.global_step)
        self.last = {"inputs": inputs.cpu(), "labels": labels.cpu(), "explained": explained.cpu(),
                     "predictions": preds.cpu(), "attributions": attributions.detach().cpu()}
        if raw_inputs is not None:
            self.last["raw_inputs"] = raw_inputs
        event = {"stage": stage, "step": step, "num_samples": len(indices), **summary}
        self.history.append(event)
        self._write(trainer, stage, step, indices, labels, preds, logits, explained, inputs, raw_inputs, attributions,
                    tables)
        metrics = {f"{self.name}/{stage}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
        if metrics and self._log_enabled:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return event

    def _write(self, trainer: Any, stage: str, step: int, indices: list[int], labels: Tensor, preds: Tensor,
               logits: Tensor, explained: Tensor, inputs: Tensor, raw_inputs: Tensor | None, attributions: Tensor,
               tables: dict[str, Any]) -> None:
        artefacts = ArtifactLogger(trainer)
        prefix = f"{self.name}/{stage}"
        probs = logits.softmax(dim=1)
        artefacts.log_table(f"{prefix}/samples", {
            "dataset_index": indices,
            "label": labels.tolist(),
            "prediction": preds.tolist(),
            "confidence": probs.max(dim=1).values.tolist(),
            "explained_class": explained.tolist(),
        }, step=step)
        artefacts.log_array(f"{prefix}/attributions", attributions.detach().float().cpu(), step=step)
        artefacts.log_array(f"{prefix}/inputs", inputs.detach().float().cpu(), step=step)  # what the model saw
        if raw_inputs is not None:
            artefacts.log_array(f"{prefix}/raw_inputs", raw_inputs.float(), step=step)  # before the batch hooks
        for suffix, table in tables.items():
            artefacts.log_table(f"{prefix}/{suffix}", table, step=step)
        # drawn over the raw inputs (as a reader knows them) where the hooks kept their shape
        shown = raw_inputs if raw_inputs is not None and raw_inputs.shape == inputs.shape else inputs
        if not self.figure:
            artefacts.log_image(f"{prefix}/overlay", overlay_grid(shown, attributions), step=step)
            return
        what = "prediction" if self.explain == "prediction" else "true class"
        title = f"{self.name} ({stage}, step {step}): attribution of the {what}"
        artefacts.log_figure(f"{prefix}/overlay", plot_attributions(
            shown, attributions, labels, preds, probs.max(dim=1).values, self.class_names, title), step=step)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "indices": {k: (list(v) if v is not None else None) for k, v in self.indices.items()},
            "validation_runs": self.validation_runs,
            "history": [dict(h) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.indices = {k: (list(v) if v is not None else None) for k, v in state_dict.get("indices", {}).items()}
        self.indices.setdefault("val", None)
        self.indices.setdefault("test", None)
        self.validation_runs = int(state_dict.get("validation_runs", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]


class SaliencyLogger(AttributionLogger):
    """Logs vanilla-gradient saliency maps ``|d logit / d x|`` of a fixed set of samples during training.

    Simonyan, Vedaldi & Zisserman, "Deep Inside Convolutional Networks: Visualising Image Classification Models and
    Saliency Maps", 2014 (Captum's ``Saliency``).

    Args:
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`AttributionLogger` (when, which samples, which class).

    Example::

        trainer = L.Trainer(callbacks=[SaliencyLogger(every_n_val_epochs=5)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())   # <log_dir>/artifacts/saliency/val/overlay_*.png

    Limits: gradients are noisy and saturate; rank 0 only under DDP; FSDP/DeepSpeed refused.
    """

    method_name = "saliency"
    default_every_n_val_epochs = 2

    def __init__(self, every_n_val_epochs: int | None = None, selection: Selection = "per_class", samples_per_class: int = 1,
                 max_samples: int = 10, explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0,
                 name: str | None = None, input_key: str | int | None = None,
                 target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        _captum_attr(type(self).__name__)

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        return saliency_map(model, inputs, target), {}


class IntegratedGradientsLogger(AttributionLogger):
    """Logs Integrated Gradients attributions of a fixed set of samples, with the completeness check reported.

    Sundararajan, Taly & Yan, "Axiomatic Attribution for Deep Networks", ICML 2017 (Captum's
    ``IntegratedGradients``). Completeness: the attributions of a sample sum to ``f(x) - f(baseline)`` of the
    explained logit. Each event logs the per-sample check as a table ``<name>/<stage>/completeness`` and the metrics
    ``completeness_gap_max``, ``completeness_relative_gap_max`` (largest gap / mean ``|f(x) - f(baseline)|`` of
    the samples), ``completeness_sample_relative_gap_max`` (the worst sample's gap / its own
    ``|f(x) - f(baseline)|``, floored at 1% of the mean) and ``completeness_samples_over_tolerance``; a warning
    names the worst sample and the fix (more ``n_steps``) when any sample's gap exceeds ``completeness_tolerance``.

    Args:
        n_steps: points of the path integral (Gauss-Legendre).
        baseline: constant baseline input (0 = black image / all-zero features).
        completeness_tolerance: relative gap above which a warning is issued.
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`AttributionLogger` (when, which samples, which class).

    Example::

        trainer = L.Trainer(callbacks=[IntegratedGradientsLogger(n_steps=64, every_n_val_epochs=5)])

    Limits: costs ``n_steps`` forward/backward passes per sample; rank 0 only under DDP; FSDP/DeepSpeed refused.
    """

    method_name = "integrated_gradients"
    default_every_n_val_epochs = 5

    def __init__(self, n_steps: int = 50, baseline: float = 0.0, completeness_tolerance: float = 0.05,
                 every_n_val_epochs: int | None = None, selection: Selection = "per_class", samples_per_class: int = 1,
                 max_samples: int = 10, explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0,
                 name: str | None = None, input_key: str | int | None = None,
                 target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        check_positive("n_steps", n_steps, integer=True)
        check_number("baseline", baseline)
        check_positive("completeness_tolerance", completeness_tolerance)
        _captum_attr(type(self).__name__)
        self.n_steps = n_steps
        self.baseline = baseline
        self.completeness_tolerance = completeness_tolerance

    def completeness_remedy(self) -> str:
        return (f"raise n_steps (now {self.n_steps}); a gap that does not shrink with n_steps points at a "
                "non-differentiable model (e.g. argmax/rounding inside forward).")

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        attributions, _ = integrated_gradients(model, inputs, target, self.baseline, self.n_steps)
        return attributions, _completeness_summary(self, model, inputs, attributions, target)


def _completeness_summary(logger: Any, model: nn.Module, inputs: Tensor, attributions: Tensor,
                          target: Tensor) -> dict[str, Any]:
    report = completeness_report(model, inputs, attributions, target, logger.baseline)
    gap, diff = report["gap"], report["output_difference"].abs()
    # relative to the typical output change (a per-sample ratio explodes where f(x) ~ f(baseline))
    worst_rel = float(gap.max() / diff.mean().clamp_min(1e-6))
    # per sample: gap / |f(x_i) - f(baseline)|, floored at 1% of the typical change for the same reason
    per_sample = gap / torch.maximum(diff, 0.01 * diff.mean()).clamp_min(1e-6)
    over = int((per_sample > logger.completeness_tolerance).sum())
    worst = int(per_sample.argmax())
    if over:
        rank_zero_warn(
            f"{type(logger).__name__}: summation check fails for {over} of {len(gap)} samples (worst: sample {worst}, "
            f"gap {float(per_sample[worst]):.3g} of its f(x) - f(baseline); over all samples max gap / mean "
            f"|f(x) - f(baseline)| = {worst_rel:.3g}) beyond completeness_tolerance={logger.completeness_tolerance}; "
            f"{logger.completeness_remedy()}"
        )
    return {
        "completeness_gap_max": float(gap.max()),
        "completeness_relative_gap_max": worst_rel,
        "completeness_sample_relative_gap_max": float(per_sample[worst]),
        "completeness_samples_over_tolerance": over,
        "tables": {"completeness": {**{k: v.tolist() for k, v in report.items()},
                                    "sample_relative_gap": per_sample.tolist()}},
    }


class DeepLiftLogger(AttributionLogger):
    """Logs DeepLIFT (Rescale rule) attributions of a fixed set of samples, with the summation-to-delta check.

    Shrikumar, Greenside & Kundaje, "Learning Important Features Through Propagating Activation Differences",
    ICML 2017 (Captum's ``DeepLift``). Like IG, the attributions sum to ``f(x) - f(baseline)``; the per-sample
    check is logged as ``<name>/<stage>/completeness`` with the same metrics as :class:`IntegratedGradientsLogger`
    (the worst sample's own relative gap included). Activations feeding a max-pool directly (``nn.ReLU`` ->
    ``nn.MaxPool2d``), which Captum alone gets wrong, are handled (see :func:`deeplift`).

    Args:
        baseline: constant reference input (0 = black image / all-zero features).
        completeness_tolerance: a sample's relative gap above which a warning is issued (a large gap means
            non-linearities DeepLIFT cannot see: functional calls such as ``F.relu``, or a module used twice; the
            warning says so - more steps do not apply to DeepLIFT).
        every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed, name,
            input_key, target_key, class_names, figure, every_n_epochs (deprecated), log:
            as for :class:`AttributionLogger` (when, which samples, which class).

    Example::

        trainer = L.Trainer(callbacks=[DeepLiftLogger(every_n_val_epochs=5)])

    Limits: non-linearities must be ``nn.Module`` instances, each used once per forward; rank 0 only under DDP;
    FSDP/DeepSpeed refused.
    """

    method_name = "deeplift"
    default_every_n_val_epochs = 2

    def __init__(self, baseline: float = 0.0, completeness_tolerance: float = 0.05, every_n_val_epochs: int | None = None,
                 selection: Selection = "per_class", samples_per_class: int = 1, max_samples: int = 10,
                 explain: Explain = "prediction", log_on_test: bool = True, seed: int = 0, name: str | None = None,
                 input_key: str | int | None = None, target_key: str | int | None = None,
                 class_names: list[str] | None = None, figure: bool = True,
                 every_n_epochs: int | None = None, log: bool = True) -> None:
        super().__init__(every_n_val_epochs, selection, samples_per_class, max_samples, explain, log_on_test, seed,
                         name, input_key, target_key, class_names, figure, every_n_epochs, log)
        check_number("baseline", baseline)
        check_positive("completeness_tolerance", completeness_tolerance)
        _captum_attr(type(self).__name__)
        self.baseline = baseline
        self.completeness_tolerance = completeness_tolerance

    def check_model(self, trainer: Any, pl_module: Any) -> None:
        inplace = [n for n, m in pl_module.named_modules() if getattr(m, "inplace", False)]
        if inplace:
            raise ValueError(
                f"DeepLiftLogger: in-place activations {inplace} break DeepLIFT's backward hooks; construct them with "
                "inplace=False."
            )

    def completeness_remedy(self) -> str:
        return ("DeepLIFT's rules see only non-linearities that are nn.Module instances called once per forward: "
                "replace functional calls (F.relu, torch.relu, x.clamp, torch.max) by modules (nn.ReLU(), "
                "nn.MaxPool2d ...), give every use its own module, or use IntegratedGradientsLogger, which needs "
                "neither (n_steps does not apply to DeepLIFT).")

    def attribute(self, model: nn.Module, inputs: Tensor, target: Tensor, trainer: Any) -> tuple[Tensor, dict[str, Any]]:
        attributions, _ = deeplift(model, inputs, target, self.baseline)
        return attributions, _completeness_summary(self, model, inputs, attributions, target)

