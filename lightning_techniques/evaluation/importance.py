"""Permutation importance of input features and ablation importance of layers: how much a metric drops when an
input feature is scrambled or a layer's output is removed.

Permutation importance: Breiman, "Random Forests", Machine Learning 2001; model-agnostic form ("model reliance"):
Fisher, Rudin & Dominici, JMLR 2019. Layer ablation: Meyes, Lu, de Puiseau & Meisen, "Ablation Studies in
Artificial Neural Networks", 2019 (zeroing a unit/layer and measuring the change in performance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.distributed import broadcast_object
from lightning_techniques._internal.eval_stages import EvaluationCallback
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_positive

ScoreFn = Callable[[Tensor, Tensor], float]


def _accuracy(outputs: Tensor, targets: Tensor) -> float:
    if outputs.ndim == 1 or outputs.shape[1] == 1:
        predicted = (outputs.reshape(-1) > 0).long()
    else:
        predicted = outputs.argmax(dim=1)
    return float((predicted == targets.long()).double().mean())


def _neg_cross_entropy(outputs: Tensor, targets: Tensor) -> float:
    return -float(F.cross_entropy(outputs.double(), targets.long()))


def _neg_mse(outputs: Tensor, targets: Tensor) -> float:
    return -float(F.mse_loss(outputs.double().reshape(targets.shape), targets.double()))


ScoreName = Literal["accuracy", "neg_cross_entropy", "neg_mse"]
SCORES: dict[str, ScoreFn] = {"accuracy": _accuracy, "neg_cross_entropy": _neg_cross_entropy, "neg_mse": _neg_mse}


def resolve_score(score: str | ScoreFn) -> ScoreFn:
    """A score function (higher is better) from its name in :data:`SCORES` or a callable ``(outputs, targets)``."""
    if callable(score):
        return score
    return SCORES[check_choice("score", score, list(SCORES))]


@torch.no_grad()
def _batched_forward(forward: Callable[[Tensor], Tensor], inputs: Tensor, batch_size: int) -> Tensor:
    return torch.cat([forward(inputs[i : i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])


@torch.no_grad()
def permutation_importance(
    forward: Callable[[Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    score: ScoreName | ScoreFn = "accuracy",
    n_repeats: int = 5,
    seed: int = 0,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Drop of ``score`` when each input feature (every element of ``inputs.shape[1:]``) is permuted across samples.

    For feature ``j`` and repeat ``r`` the column ``inputs[:, j]`` is shuffled with a seeded permutation and the
    model re-scored; ``importance[j] = baseline - mean_r score_r`` (> 0: the model relies on the feature; exactly 0
    for a feature the model ignores or that is constant in ``inputs``).

    Args:
        forward: ``forward(x) -> outputs`` (e.g. the model).
        inputs: ``[N, ...]`` evaluation inputs; targets: ``[N]``.
        score: ``"accuracy"``, ``"neg_cross_entropy"``, ``"neg_mse"`` or ``fn(outputs, targets) -> float``.
        n_repeats: permutations per feature.
        seed: seed of the permutations.
        batch_size: samples per forward call (several permuted copies are stacked into one call).

    Returns:
        ``{"baseline": float, "importance": Tensor[inputs.shape[1:]], "std": Tensor[...]}``.
    """
    check_positive("n_repeats", n_repeats, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    score_fn = resolve_score(score)
    n = inputs.shape[0]
    feature_shape = inputs.shape[1:]
    flat = inputs.reshape(n, -1)
    num_features = flat.shape[1]
    baseline = score_fn(_batched_forward(forward, inputs, batch_size), targets)
    generator = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(n, generator=generator) for _ in range(n_repeats)]
    drops = torch.zeros(num_features, n_repeats, dtype=torch.float64)
    copies = max(1, batch_size // max(n, 1))  # permuted copies per forward call
    jobs = [(j, r) for j in range(num_features) for r in range(n_repeats)]
    for start in range(0, len(jobs), copies):
        chunk = jobs[start : start + copies]
        stacked = flat.unsqueeze(0).repeat(len(chunk), 1, 1)
        for k, (j, r) in enumerate(chunk):
            stacked[k, :, j] = flat[perms[r], j]
        outputs = _batched_forward(forward, stacked.reshape(len(chunk) * n, *feature_shape), batch_size)
        for k, (j, r) in enumerate(chunk):
            drops[j, r] = baseline - score_fn(outputs[k * n : (k + 1) * n], targets)
    return {
        "baseline": baseline,
        "importance": drops.mean(dim=1).reshape(feature_shape),
        "std": (drops.std(dim=1) if n_repeats > 1 else torch.zeros(num_features, dtype=torch.float64)).reshape(feature_shape),
    }


@torch.no_grad()
def ablation_importance(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    layers: Sequence[str],
    score: ScoreName | ScoreFn = "accuracy",
    mode: Literal["zero", "mean"] = "zero",
    forward: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 4096,
) -> dict[str, Any]:
    """Drop of ``score`` when the output of each named layer is removed (one layer at a time).

    ``mode="zero"`` replaces the layer's output with zeros; ``mode="mean"`` with its mean over the evaluated
    samples (keeps the scale that later layers expect; "mean ablation"). The model's weights are never changed:
    a forward hook replaces the output and is removed afterwards.

    Returns:
        ``{"baseline": float, "importance": {layer: baseline - ablated score}}``.
    """
    check_choice("mode", mode, ["zero", "mean"])
    score_fn = resolve_score(score)
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not in {type(model).__name__}; it has {[n for n in modules if n]}.")
    run = forward if forward is not None else model
    baseline = score_fn(_batched_forward(run, inputs, batch_size), targets)
    result: dict[str, float] = {}
    for name in layers:
        seen: list[Tensor] = []
        mean_value: Tensor | None = None
        if mode == "mean":
            def keep(_m: nn.Module, _i: Any, out: Any, seen: list[Tensor] = seen) -> None:
                seen.append(out.detach())
            handle = modules[name].register_forward_hook(keep)
            try:
                _batched_forward(run, inputs, batch_size)
            finally:
                handle.remove()
            mean_value = torch.cat(seen).mean(dim=0, keepdim=True)

        def replace(_m: nn.Module, _i: Any, out: Any, name: str = name, mean_value: Tensor | None = mean_value) -> Any:
            if not isinstance(out, Tensor):
                raise TypeError(f"layer {name!r} returns {type(out).__name__}; only tensor outputs can be ablated.")
            return torch.zeros_like(out) if mean_value is None else mean_value.expand_as(out).clone()

        handle = modules[name].register_forward_hook(replace)
        try:
            result[name] = baseline - score_fn(_batched_forward(run, inputs, batch_size), targets)
        finally:
            handle.remove()
    return {"baseline": baseline, "importance": result}


def _bar_figure(names: list[str], values: list[float], title: str, errors: list[float] | None = None,
                xlabel: str = "score drop") -> Any:
    """Horizontal bars of the 30 largest ``values`` (largest on top), with ``errors`` as error bars when given."""
    figure_mod = require("matplotlib.figure", "interpret", "PermutationImportance figures")
    order = sorted(range(len(values)), key=lambda i: values[i], reverse=True)[:30]
    fig = figure_mod.Figure(figsize=(5.5, 0.28 * len(order) + 1.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.barh([names[i] for i in order][::-1], [values[i] for i in order][::-1], color="tab:blue",
            xerr=[errors[i] for i in order][::-1] if errors is not None else None, capsize=2,
            error_kw={"elinewidth": 1, "ecolor": "black"})
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig


class PermutationImportance(EvaluationCallback):
    """At test end (and optionally every N validation epochs), measures how much the score drops when each input
    feature is permuted (permutation importance, Breiman 2001; Fisher, Rudin & Dominici 2019) and when the output
    of each named layer is removed (ablation, Meyes et al. 2019), and writes tables and figures.

    Inputs and targets of the evaluation batches are kept on rank 0 (up to ``max_samples``); at the epoch's end
    rank 0 re-runs the module (already in eval mode, no gradients) on permuted copies and on layer-ablated
    forwards, and broadcasts the result so every rank holds ``self.results``. Nothing about the model changes:
    ablation uses forward hooks that are removed afterwards, and no weight, mode or ``requires_grad`` is touched.

    Artefacts (``importance/<val|test>_...``): ``features`` table (and figure: a heat map when the input is an
    image ``[C, H, W]`` / ``[H, W]``, else a bar chart of the 30 largest), ``layers`` table and bar chart.

    Args:
        features: compute permutation importance of the input features.
        layers: qualified names of layers to ablate (e.g. ``["features.0", "head"]``); none by default.
        ablation_mode: ``"zero"`` or ``"mean"`` (see :func:`ablation_importance`).
        score: ``"accuracy"``, ``"neg_cross_entropy"`` or ``"neg_mse"`` (higher is better).
        n_repeats: permutations per feature.
        max_samples: evaluation samples kept (the first ones of rank 0).
        stages: ``"test"`` and/or ``"validate"``.
        every_n_val_epochs: with ``"validate"`` in ``stages``, measure every N-th validation epoch.
        feature_names: names of the (flattened) input features for tables and bar charts.
        seed: seed of the permutations.
        batch_size: samples per forward call.
        input_key, target_key: where input/target are in a dict/tuple batch.

    Example::

        trainer = L.Trainer(callbacks=[PermutationImportance(layers=["net.0", "net.2"])])
        dm = BreastCancerDataModule()
        trainer.fit(TabularMLP(), datamodule=dm)
        trainer.test(datamodule=dm)

    Limits: single-tensor inputs whose features are the elements of ``inputs[i]`` (for correlated features the
    importance of each is understated: permuting one leaves its twin); cost is
    ``n_features x n_repeats x max_samples`` forward samples, so keep it to test time for large inputs; under DDP
    only rank 0's share of the evaluation set is used.
    """

    def __init__(
        self,
        features: bool = True,
        layers: list[str] | None = None,
        ablation_mode: Literal["zero", "mean"] = "zero",
        score: ScoreName = "accuracy",
        n_repeats: int = 5,
        max_samples: int = 512,
        stages: Sequence[str] = ("test",),
        every_n_val_epochs: int = 1,
        feature_names: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 4096,
        input_key: str | int | None = None,
        target_key: str | int | None = None,
    ) -> None:
        check_choice("ablation_mode", ablation_mode, ["zero", "mean"])
        check_choice("score", score, list(SCORES))
        check_positive("n_repeats", n_repeats, integer=True)
        check_positive("max_samples", max_samples, integer=True)
        check_positive("every_n_val_epochs", every_n_val_epochs, integer=True)
        check_positive("batch_size", batch_size, integer=True)
        if isinstance(stages, str) or not stages:
            raise ValueError(f"stages={stages!r} must be a non-empty list of 'validate' and/or 'test'.")
        for stage in stages:
            check_choice("stages", stage, ["validate", "test"])
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise TypeError(f"layers must be a list of layer names, got {layers!r}.")
        if not features and not layers:
            raise ValueError("PermutationImportance has nothing to do: set features=True or name layers=[...].")
        self.features = features
        self.layers = list(layers) if layers else None
        self.ablation_mode = ablation_mode
        self.score = score
        self.n_repeats = n_repeats
        self.max_samples = max_samples
        self.stages = list(stages)
        self.every_n_val_epochs = every_n_val_epochs
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.seed = seed
        self.batch_size = batch_size
        self.input_key = input_key
        self.target_key = target_key
        self.results: dict[str, dict[str, Any]] = {}
        super().__init__()  # val_epochs_seen
        self._inputs: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._active = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        require("matplotlib", "interpret", "PermutationImportance figures")
        if self.layers:
            names = dict(pl_module.named_modules())
            missing = [n for n in self.layers if n not in names]
            if missing:
                raise ValueError(
                    f"PermutationImportance: layers {missing} are not in {type(pl_module).__name__}; its layers are "
                    f"{[n for n in names if n]}."
                )

    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._inputs, self._targets = [], []
        self._active = False
        if stage not in self.stages or trainer.sanity_checking:
            return
        if stage == "validate" and not self.validation_due(trainer):
            return
        self._active = True

    def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                   stage: str) -> None:
        if not self._active or not trainer.is_global_zero:
            return
        have = sum(t.shape[0] for t in self._targets)
        if have >= self.max_samples:
            return
        take = self.max_samples - have
        self._inputs.append(get_inputs(batch, self.input_key)[:take].detach().clone())
        self._targets.append(get_targets(batch, self.target_key)[:take].detach().clone())

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self._active:
            return
        self._active = False
        result: dict[str, Any] | None = None
        if trainer.is_global_zero:
            inputs, targets = torch.cat(self._inputs), torch.cat(self._targets)
            result = {"n": int(targets.shape[0])}
            with torch.no_grad():
                if self.features:
                    perm = permutation_importance(pl_module, inputs, targets, self.score, self.n_repeats, self.seed,
                                                  self.batch_size)
                    result["baseline"] = perm["baseline"]
                    result["features"] = perm["importance"].cpu()
                    result["features_std"] = perm["std"].cpu()
                if self.layers:
                    abl = ablation_importance(pl_module, inputs, targets, self.layers, self.score, self.ablation_mode,
                                              batch_size=self.batch_size)
                    result["baseline"] = abl["baseline"]
                    result["layers"] = abl["importance"]
        self._inputs, self._targets = [], []
        result = broadcast_object(trainer.strategy, result)
        assert result is not None  # rank 0 computed it; the broadcast delivered it to every rank
        name = "val" if stage == "validate" else "test"
        self.results[name] = result
        if trainer.is_global_zero:
            self._publish(trainer, name, result)

    def _publish(self, trainer: Any, name: str, result: dict[str, Any]) -> None:
        artifacts = ArtifactLogger(trainer)
        summary = [f"baseline {self.score}={result['baseline']:.4f} on {result['n']} samples"]
        if "features" in result:
            imp, std = result["features"], result["features_std"]
            flat, flat_std = imp.reshape(-1).tolist(), std.reshape(-1).tolist()
            names = self._names(len(flat))
            artifacts.log_table(f"importance/{name}_features",
                                [{"feature": names[i], "importance": flat[i], "std": flat_std[i]} for i in range(len(flat))])
            artifacts.log_array(f"importance/{name}_features", imp)
            if imp.ndim in (2, 3) and self.feature_names is None:
                figure_mod = require("matplotlib.figure", "interpret", "PermutationImportance figures")
                image = imp if imp.ndim == 2 else imp.abs().sum(dim=0)
                spread = std if std.ndim == 2 else std.abs().sum(dim=0)
                panels = [(image, f"permutation importance ({name})", f"{self.score} drop")]
                if self.n_repeats > 1:  # the image analogue of error bars: the spread over the repeats
                    panels.append((spread, f"std over {self.n_repeats} permutations", f"std of the {self.score} drop"))
                fig = figure_mod.Figure(figsize=(3.8 * len(panels), 3.2), layout="constrained")
                for k, (values, title, label) in enumerate(panels):
                    ax = fig.add_subplot(1, len(panels), k + 1)
                    im = ax.imshow(values.numpy(), cmap="viridis")
                    fig.colorbar(im, ax=ax, label=label)
                    ax.set_title(title, fontsize=9)
                    ax.set_xticks([])
                    ax.set_yticks([])
                artifacts.log_figure(f"importance/{name}_features", fig)
            else:
                repeats = f"mean ± std over {self.n_repeats} permutations" if self.n_repeats > 1 else "one permutation"
                artifacts.log_figure(f"importance/{name}_features", _bar_figure(
                    names, flat, f"permutation importance ({name})", flat_std if self.n_repeats > 1 else None,
                    f"{self.score} drop ({repeats})"))
            top = sorted(range(len(flat)), key=lambda i: flat[i], reverse=True)[:5]
            summary.append("top features: " + ", ".join(f"{names[i]} ({flat[i]:.3f})" for i in top))
        if "layers" in result:
            layers = result["layers"]
            artifacts.log_table(f"importance/{name}_layers", [{"layer": k, "importance": v} for k, v in layers.items()])
            artifacts.log_figure(f"importance/{name}_layers",
                                 _bar_figure(list(layers), list(layers.values()), f"layer ablation ({self.ablation_mode}, {name})"))
            summary.append("layers: " + ", ".join(f"{k} ({v:.3f})" for k, v in layers.items()))
        rank_zero_info("PermutationImportance: " + "; ".join(summary))

    def _names(self, count: int) -> list[str]:
        if self.feature_names is None:
            return [f"x{i}" for i in range(count)]
        if len(self.feature_names) != count:
            raise ValueError(f"feature_names has {len(self.feature_names)} names but the input has {count} features.")
        return self.feature_names


__all__ = ["PermutationImportance", "ablation_importance", "permutation_importance", "resolve_score"]
