"""Evaluation report: the metrics a reader expects, with bootstrap confidence intervals, tables and figures.

Classification: accuracy, balanced accuracy, precision / recall / F1 (macro, micro, per class), AUROC and average
precision, the confusion matrix and the expected calibration error (ECE, Guo et al., "On Calibration of Modern
Neural Networks", ICML 2017) with its reliability diagram (DeGroot & Fienberg 1983; Niculescu-Mizil & Caruana 2005).
Regression: MAE, RMSE and R^2. Confidence intervals: the percentile bootstrap (Efron, "Bootstrap methods: another
look at the jackknife", 1979; Efron & Tibshirani 1993), resampling the evaluated samples with replacement.

Every metric is computed with ``torchmetrics`` functional metrics on predictions that a ``torchmetrics.Metric``
collected during the evaluation loop, so that under DDP ``compute()`` gathers every rank's share first.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
import torchmetrics.functional.classification as tmc
import torchmetrics.functional.regression as tmr
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.distributed import broadcast_object
from lightning_techniques._internal.eval_stages import EvaluationCallback
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice, check_number, check_positive

CLASSIFICATION_SCALARS = (
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "precision_micro",
    "recall_micro",
    "f1_micro",
    "auroc",
    "average_precision",
    "ece",
)
REGRESSION_SCALARS = ("mae", "rmse", "r2")


# ----------------------------------------------------------------------------------------------- functional core
def outputs_to_probabilities(outputs: Tensor, output_type: str = "logits") -> Tensor:
    """Model outputs -> class probabilities ``[N, C]``.

    ``[N, C]`` logits get a softmax (``output_type="logits"``) or are taken as probabilities (``"probs"``);
    ``[N]`` / ``[N, 1]`` outputs are a binary model's positive-class logit (sigmoid) or probability, returned as
    two columns ``[1 - p, p]``.
    """
    check_choice("output_type", output_type, ["logits", "probs"])
    outputs = outputs.detach().float()
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if outputs.ndim == 1:
        p = torch.sigmoid(outputs) if output_type == "logits" else outputs
        return torch.stack([1.0 - p, p], dim=1)
    if outputs.ndim != 2:
        raise ValueError(f"classification outputs must be [N, C], [N, 1] or [N]; got shape {tuple(outputs.shape)}.")
    return outputs.softmax(dim=1) if output_type == "logits" else outputs


def reliability_bins(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Top-label reliability diagram data: per equal-width confidence bin, the mean confidence, the accuracy and
    the number of samples (bin ``i`` holds confidences in ``[i/n, (i+1)/n)``, the last one also 1.0).

    ``ece = sum(count / N * |accuracy - confidence|)`` (Guo et al. 2017), computed exactly as torchmetrics'
    ``multiclass_calibration_error`` does (which gives confidence 1.0 a bin of its own).
    """
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).to(confidence.dtype)

    def binned(index: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor]:
        count = torch.zeros(size, dtype=confidence.dtype).index_add_(0, index, torch.ones_like(confidence))
        conf_sum = torch.zeros(size, dtype=confidence.dtype).index_add_(0, index, confidence)
        acc_sum = torch.zeros(size, dtype=confidence.dtype).index_add_(0, index, correct)
        return count, conf_sum / count.clamp(min=1), acc_sum / count.clamp(min=1)

    edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype)
    tm_count, tm_conf, tm_acc = binned(torch.bucketize(confidence, edges, right=True) - 1, n_bins + 1)
    ece = ((tm_count / tm_count.sum()) * (tm_acc - tm_conf).abs()).sum()
    count, conf_mean, acc_mean = binned((confidence * n_bins).long().clamp(0, n_bins - 1), n_bins)
    return {"edges": edges, "confidence": conf_mean, "accuracy": acc_mean, "count": count, "ece": ece}


def _average_precision(scores: Tensor, positive: Tensor) -> float:
    """Step-wise average precision (sklearn's / torchmetrics' definition, ties grouped), one class."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], positive[order].double()
    last = torch.cat([torch.nonzero(s[1:] != s[:-1]).flatten(), torch.tensor([s.numel() - 1])])
    tps = torch.cumsum(t, 0)[last]
    precision = tps / (last + 1).double()
    recall = tps / tps[-1]
    return float(((recall - torch.cat([recall.new_zeros(1), recall[:-1]])) * precision).sum())


def fast_classification_scalars(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """The same numbers as :func:`classification_scalars`, from a confusion matrix, tie-averaged ranks
    (Mann-Whitney AUROC) and :func:`reliability_bins`: about 50x faster, which is what makes a 200-resample
    bootstrap cheap (torchmetrics' calibration error alone takes ~50 ms a call on CPU). Tests check it against
    :func:`classification_scalars`."""
    from scipy.stats import rankdata  # scipy comes with scikit-learn (extra "interpret")

    n, num_classes = probs.shape
    targets = targets.long()
    predicted = probs.argmax(dim=1)
    cm = torch.bincount(targets * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)
    cm = cm.double()
    tp = cm.diag()
    support, predicted_count = cm.sum(1), cm.sum(0)
    fp, fn = predicted_count - tp, support - tp
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    counted = (tp + fp + fn) > 0
    present = support > 0
    accuracy = float(tp.sum() / n)
    out = {
        "accuracy": accuracy,
        "balanced_accuracy": float(recall[present].mean()),
        "precision_macro": float(precision[counted].mean()),
        "recall_macro": float(recall[counted].mean()),
        "f1_macro": float(f1[counted].mean()),
        "precision_micro": accuracy,
        "recall_micro": accuracy,
        "f1_micro": accuracy,
    }
    classes = [c for c in range(num_classes) if present[c]] if num_classes > 2 else [1]
    if int(present.sum()) < 2:
        out["auroc"] = out["average_precision"] = math.nan
    else:
        ranks = torch.from_numpy(rankdata(probs.double().numpy(), axis=0))
        aurocs, aps = [], []
        for c in classes:
            pos = targets == c
            n_pos, n_neg = float(pos.sum()), float((~pos).sum())
            aurocs.append((float(ranks[pos, c].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
            aps.append(_average_precision(probs[:, c], pos))
        out["auroc"] = sum(aurocs) / len(aurocs)
        out["average_precision"] = sum(aps) / len(aps)
    out["ece"] = float(reliability_bins(probs, targets, n_bins)["ece"])
    return out


def _quiet(fn: Callable[[], Tensor]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about classes absent from a (bootstrap) sample
        return fn()


def classification_scalars(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, float]:
    """The scalar classification metrics (:data:`CLASSIFICATION_SCALARS`) of ``probs [N, C]`` vs ``targets [N]``.

    AUROC and average precision are one-vs-rest macro averages over the classes present in ``targets`` (for two
    classes: those of class 1); NaN when fewer than two classes are present. ECE is the top-label L1 calibration
    error over ``n_bins`` equal-width bins (torchmetrics' binning, see :func:`reliability_bins`).
    """
    num_classes = probs.shape[1]
    targets = targets.long()
    out: dict[str, float] = {}
    kw: dict[str, Any] = {"num_classes": num_classes, "validate_args": False}
    out["accuracy"] = float(tmc.multiclass_accuracy(probs, targets, average="micro", **kw))
    present = torch.bincount(targets, minlength=num_classes) > 0
    recall = tmc.multiclass_recall(probs, targets, average="none", **kw)
    out["balanced_accuracy"] = float(recall[present].mean())
    for average in ("macro", "micro"):
        out[f"precision_{average}"] = float(_quiet(partial(tmc.multiclass_precision, probs, targets, average=average, **kw)))
        out[f"recall_{average}"] = float(_quiet(partial(tmc.multiclass_recall, probs, targets, average=average, **kw)))
        out[f"f1_{average}"] = float(_quiet(partial(tmc.multiclass_f1_score, probs, targets, average=average, **kw)))
    if int(present.sum()) < 2:
        out["auroc"] = out["average_precision"] = math.nan
    elif num_classes == 2:
        out["auroc"] = float(tmc.binary_auroc(probs[:, 1], targets, validate_args=False))
        out["average_precision"] = float(tmc.binary_average_precision(probs[:, 1], targets, validate_args=False))
    else:
        auroc = _quiet(lambda: tmc.multiclass_auroc(probs, targets, average="none", **kw))
        ap = _quiet(lambda: tmc.multiclass_average_precision(probs, targets, average="none", **kw))
        out["auroc"] = float(auroc[present].mean())
        out["average_precision"] = float(ap[present].mean())
    # torchmetrics' multiclass_calibration_error takes ~50 ms a call on CPU; reliability_bins bins exactly as it
    # does (tests check the two agree) in well under 1 ms
    out["ece"] = float(reliability_bins(probs, targets, n_bins)["ece"])
    return out


def classification_report(probs: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, Any]:
    """Scalars (:func:`classification_scalars`), per-class precision/recall/F1/support, the confusion matrix
    (rows: true class, columns: predicted) and the reliability-diagram bins."""
    probs, targets = probs.float(), targets.long()
    num_classes = probs.shape[1]
    kw: dict[str, Any] = {"num_classes": num_classes, "average": "none", "validate_args": False}
    per_class = {
        "precision": _quiet(lambda: tmc.multiclass_precision(probs, targets, **kw)),
        "recall": _quiet(lambda: tmc.multiclass_recall(probs, targets, **kw)),
        "f1": _quiet(lambda: tmc.multiclass_f1_score(probs, targets, **kw)),
        "support": torch.bincount(targets, minlength=num_classes).float(),
    }
    return {
        "scalars": classification_scalars(probs, targets, n_bins),
        "per_class": {k: v.tolist() for k, v in per_class.items()},
        "confusion_matrix": tmc.multiclass_confusion_matrix(probs, targets, num_classes, validate_args=False).long(),
        "reliability": reliability_bins(probs, targets, n_bins),
        "n": int(targets.numel()),
    }


def regression_scalars(preds: Tensor, targets: Tensor) -> dict[str, float]:
    """MAE, RMSE and R^2 (uniform average over outputs for multi-output regression)."""
    preds, targets = preds.float(), targets.float()
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if preds.shape != targets.shape:
        raise ValueError(f"regression outputs {tuple(preds.shape)} and targets {tuple(targets.shape)} differ in shape.")
    outputs = 1 if preds.ndim == 1 else preds.shape[1]
    mse = tmr.mean_squared_error(preds, targets, num_outputs=outputs)
    return {
        "mae": float(tmr.mean_absolute_error(preds, targets)),
        "rmse": float(mse.sqrt().mean()),
        "r2": float(tmr.r2_score(preds, targets)) if preds.shape[0] > 1 else math.nan,
    }


def bootstrap_ci(
    metric_fn: Callable[[Tensor, Tensor], dict[str, float]],
    preds: Tensor,
    targets: Tensor,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile-bootstrap confidence intervals of every scalar ``metric_fn(preds, targets)`` returns.

    Samples are drawn with replacement ``n_resamples`` times (a seeded generator: the same interval every run);
    the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled values
    (NaN resamples, e.g. AUROC of a resample missing a class, are left out).
    """
    check_positive("n_resamples", n_resamples, integer=True)
    check_number("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    n = targets.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    values: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        index = torch.randint(0, n, (n,), generator=generator)
        for key, value in metric_fn(preds[index], targets[index]).items():
            values.setdefault(key, []).append(value)
    lo_q, hi_q = (1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0
    intervals = {}
    for key, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        t = t[~t.isnan()]
        if t.numel() == 0:
            intervals[key] = (math.nan, math.nan)
        else:
            intervals[key] = (float(torch.quantile(t, lo_q)), float(torch.quantile(t, hi_q)))
    return intervals


def plot_confusion_matrix(matrix: Tensor, class_names: Sequence[str] | None = None, title: str = "") -> Any:
    """A matplotlib Figure of the confusion matrix, rows normalised to the true class (counts annotated)."""
    figure_mod = require("matplotlib.figure", "interpret", "EvaluationReport figures")
    m = matrix.double()
    norm = m / m.sum(dim=1, keepdim=True).clamp(min=1)
    c = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    size = min(1.0 + 0.45 * c, 9.0)
    fig = figure_mod.Figure(figsize=(size, size * 0.9))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if c <= 20:
        for i in range(c):
            for j in range(c):
                if m[i, j] > 0:
                    ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), names, rotation=90 if c > 10 else 0)
    ax.set_yticks(range(c), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return fig


def plot_reliability(bins: dict[str, Tensor], title: str = "") -> Any:
    """A matplotlib Figure of the reliability diagram: accuracy vs confidence per bin with the diagonal and the
    gap to it, and below it the number of samples in each bin (annotated), so a reader sees which bins rest on a
    handful of samples."""
    figure_mod = require("matplotlib.figure", "interpret", "EvaluationReport figures")
    edges = bins["edges"].numpy()
    width = edges[1] - edges[0]
    count = bins["count"].numpy()
    filled = count > 0
    fig = figure_mod.Figure(figsize=(4.4, 5.4), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(edges[:-1][filled], bins["accuracy"].numpy()[filled], width=width, align="edge", edgecolor="k",
           color="tab:blue", alpha=0.8, label="accuracy")
    ax.bar(edges[:-1][filled], (bins["confidence"] - bins["accuracy"]).numpy()[filled],
           bottom=bins["accuracy"].numpy()[filled], width=width, align="edge", color="tab:red", alpha=0.3,
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title or f"reliability (ECE {float(bins['ece']):.3f}, n={int(count.sum())})")
    ax.legend(loc="upper left", fontsize=8)
    hist.bar(edges[:-1], count, width=width, align="edge", edgecolor="k", color="tab:gray")
    top = float(count.max()) if count.size else 1.0
    for left, c in zip(edges[:-1], count):
        if c > 0:
            hist.text(left + width / 2, c + 0.03 * top, str(int(c)), ha="center", va="bottom", fontsize=6)
    hist.set_ylim(0, 1.25 * max(top, 1.0))
    hist.set_xlabel("confidence")
    hist.set_ylabel("samples")
    return fig


# --------------------------------------------------------------------------------------------- Lightning adapter
class _Collected(Metric):
    """Predictions and targets of one evaluation epoch, gathered from every rank on ``compute()``."""

    full_state_update = False
    preds: list[Tensor]  # list states registered by add_state below (Metric.__getattr__ is typed Tensor | Module)
    targets: list[Tensor]

    def __init__(self) -> None:
        super().__init__(dist_sync_on_step=False)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, preds: Tensor, targets: Tensor) -> None:
        self.preds.append(preds)
        self.targets.append(targets)

    def compute(self) -> tuple[Tensor, Tensor]:
        return dim_zero_cat(self.preds), dim_zero_cat(self.targets)


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        for key in ("logits", "preds", "predictions", "output"):
            if isinstance(output.get(key), Tensor):
                return output[key]
        return None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):  # transformers ModelOutput
        return output.logits
    return None


_STAGE_NAMES = {"validate": "val", "test": "test"}
SUMMARY_MODES = ("end", "compact", "full", "none")
#: the scalars of the compact summary line
_COMPACT = {"classification": ("accuracy", "balanced_accuracy", "f1_macro", "ece"), "regression": ("mae", "rmse", "r2")}


class EvaluationReport(EvaluationCallback):
    """Computes, at the end of validation and/or test, the metrics a reader expects, and writes them as tables and
    figures; at test end each scalar gets a percentile-bootstrap confidence interval.

    Classification (integer targets): accuracy, balanced accuracy, precision/recall/F1 (macro, micro, per class),
    AUROC and average precision (one-vs-rest macro; class 1 for binary), the confusion matrix, and the expected
    calibration error with a reliability diagram (Guo et al., ICML 2017). Regression (float targets): MAE, RMSE,
    R^2. Confidence intervals: percentile bootstrap (Efron 1979).

    How predictions are obtained, without editing the module: ``capture="forward_hook"`` (default) registers a
    forward hook on the LightningModule for the evaluation epoch and keeps the output of the module's own forward
    call in ``validation_step`` / ``test_step`` (the last tensor output whose first dimension equals the batch's
    target count), so evaluation costs nothing extra. ``capture="rerun"`` instead runs ``module(inputs)`` once more
    per batch in ``on_*_batch_end`` (doubles the forward cost; for modules whose step does not call ``self(...)``).
    Predictions and targets are collected in a ``torchmetrics.Metric``: under DDP every rank takes part in its
    ``compute()`` (an all-gather), rank 0 computes the report and broadcasts it, and only rank 0 writes files.

    Artefacts (through the shared artefact logging, names prefixed ``evaluation/<val|test>_``): ``metrics`` table
    (value, and ``ci_low``/``ci_high`` at test), ``per_class`` table, ``confusion_matrix`` table and figure,
    ``reliability`` figure (figures at test only unless ``validation_figures=True``; validation files are one
    ``..._latest`` set replaced each report unless ``keep_every_epoch=True``). Scalars are also logged as
    ``report/<val|test>_<metric>`` through ``pl_module.log``. The latest report per stage is kept in
    ``self.results["val" | "test"]``; what is printed is set by ``summary`` (by default: once at the end).

    Args:
        task: ``"auto"`` (integer targets: classification, float: regression), ``"classification"`` or
            ``"regression"``.
        stages: any of ``"validate"``, ``"test"``.
        every_n_val_epochs: report every N-th validation epoch (the sanity check never counts).
        output_type: classification outputs are ``"logits"`` (softmax / sigmoid applied) or ``"probs"``.
        class_names: names for tables and figures (default: class indices).
        n_bins: confidence bins of the ECE and the reliability diagram.
        bootstrap_resamples: resamples for the confidence intervals at test end (0: none).
        confidence: confidence level of the intervals.
        bootstrap_on_validation: also compute intervals at validation ends.
        seed: seed of the bootstrap resampling.
        capture: ``"forward_hook"`` or ``"rerun"`` (see above).
        input_key, target_key: where input/target are in a dict/tuple batch (default element 0/1 or known keys).
        figures: write the confusion-matrix and reliability figures (needs matplotlib) at test end.
        validation_figures: also write them at validation ends (off by default: drawing costs ~0.5 s a report).
        log_scalars: also log the scalars through ``pl_module.log``.
        summary: what is printed (rank 0, Lightning's logger at INFO): ``"end"`` (default) the full summary after
            ``trainer.test`` / ``trainer.validate`` and the last validation report once at the end of ``fit``;
            ``"compact"`` also one short line per validation report; ``"full"`` the full summary every report;
            ``"none"`` nothing. Never more than one line per report.
        keep_every_epoch: write validation tables (and figures) of every report as their own files
            (``..._step<N>``); by default one ``..._latest`` set is replaced each validation (test reports keep their
            step-named files).

    Example::

        trainer = L.Trainer(callbacks=[EvaluationReport(class_names=[str(i) for i in range(10)])])
        dm = DigitsDataModule()
        trainer.fit(DigitsCNN(), datamodule=dm)
        trainer.test(datamodule=dm)      # evaluation/test_metrics_step*.csv with 95% bootstrap intervals

    Limits: every evaluated prediction is kept (in memory, on every rank after the gather) until the epoch's report,
    so it suits evaluation sets up to ~10^6 samples x classes; under DDP Lightning's ``DistributedSampler`` pads the
    evaluation set with repeated samples when its size is not a multiple of the world size (exactly as the module's
    own ``sync_dist`` metrics see them); several evaluation dataloaders are pooled into one report; multi-label
    classification is not supported.
    """

    def __init__(
        self,
        task: Literal["auto", "classification", "regression"] = "auto",
        stages: Sequence[str] = ("validate", "test"),
        every_n_val_epochs: int = 1,
        output_type: Literal["logits", "probs"] = "logits",
        class_names: list[str] | None = None,
        n_bins: int = 15,
        bootstrap_resamples: int = 200,
        confidence: float = 0.95,
        bootstrap_on_validation: bool = False,
        seed: int = 0,
        capture: Literal["forward_hook", "rerun"] = "forward_hook",
        input_key: str | int | None = None,
        target_key: str | int | None = None,
        figures: bool = True,
        validation_figures: bool = False,
        log_scalars: bool = True,
        summary: Literal["end", "compact", "full", "none"] = "end",
        keep_every_epoch: bool = False,
    ) -> None:
        check_choice("task", task, ["auto", "classification", "regression"])
        if isinstance(stages, str) or not stages:
            raise ValueError(f"stages={stages!r} must be a non-empty list of 'validate' and/or 'test'.")
        for stage in stages:
            check_choice("stages", stage, ["validate", "test"])
        check_positive("every_n_val_epochs", every_n_val_epochs, integer=True)
        check_choice("output_type", output_type, ["logits", "probs"])
        check_positive("n_bins", n_bins, integer=True)
        check_number("bootstrap_resamples", bootstrap_resamples, low=0, integer=True)
        check_number("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        check_choice("capture", capture, ["forward_hook", "rerun"])
        check_choice("summary", summary, SUMMARY_MODES)
        if class_names is not None and (isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)):
            raise TypeError(f"class_names must be a list of strings, got {class_names!r}.")
        self.task = task
        self.stages = list(stages)
        self.every_n_val_epochs = every_n_val_epochs
        self.output_type = output_type
        self.class_names = list(class_names) if class_names is not None else None
        self.n_bins = n_bins
        self.bootstrap_resamples = bootstrap_resamples
        self.confidence = confidence
        self.bootstrap_on_validation = bootstrap_on_validation
        self.seed = seed
        self.capture = capture
        self.input_key = input_key
        self.target_key = target_key
        self.figures = figures
        self.validation_figures = validation_figures
        self.log_scalars = log_scalars
        self.summary = summary
        self.keep_every_epoch = keep_every_epoch
        self.results: dict[str, dict[str, Any]] = {}
        super().__init__()  # val_epochs_seen
        self._collector: _Collected | None = None
        self._active = False
        self._hook: Any = None
        self._outputs: list[Tensor] = []
        self._task_resolved: str | None = None if task == "auto" else task

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.figures:
            require("matplotlib", "interpret", "EvaluationReport(figures=True)")
        from lightning.pytorch import LightningModule
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("forward", pl_module, parent=LightningModule):
            raise TypeError(
                f"EvaluationReport needs {type(pl_module).__name__} to define forward(): its predictions are the "
                "outputs of the module's forward calls (capture='forward_hook') or of module(inputs) (capture='rerun')."
            )

    def _stop(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._active = False
        self._outputs = []
        if self._collector is not None:
            self._collector.reset()

    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop()
        if stage not in self.stages or trainer.sanity_checking:
            return
        if stage == "validate" and not self.validation_due(trainer):
            return
        self._active = True
        if self._collector is None:
            self._collector = _Collected()
        self._collector = self._collector.to(pl_module.device)
        self._collector.reset()
        if self.capture == "forward_hook":
            self._hook = pl_module.register_forward_hook(self._record)

    def _record(self, _module: Any, _inputs: Any, output: Any) -> None:
        tensor = _first_tensor(output)
        if tensor is not None and tensor.ndim >= 1:
            self._outputs.append(tensor.detach())

    def _batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        self._outputs = []

    def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                   stage: str) -> None:
        if not self._active:
            return
        targets = get_targets(batch, self.target_key).detach()
        n = targets.shape[0]
        if self.capture == "rerun":
            with torch.no_grad():
                output = _first_tensor(pl_module(get_inputs(batch, self.input_key)))
            matching = [output] if output is not None and output.ndim >= 1 and output.shape[0] == n else []
        else:
            matching = [o for o in self._outputs if o.shape[0] == n and o.is_floating_point()]
        self._outputs = []
        if not matching:
            raise RuntimeError(
                f"EvaluationReport: no forward output of {type(pl_module).__name__} with batch size {n} was seen "
                "during this evaluation step (capture='forward_hook' keeps what the module's own forward returns). "
                "If the step does not call self(...), use capture='rerun'."
            )
        output = matching[-1]
        task = self._resolve_task(targets)
        if task == "classification":
            preds = outputs_to_probabilities(output, self.output_type)
            targets = targets.long() if not targets.is_floating_point() else targets.round().long()
        else:
            preds = output.detach().float()
        self._collector.update(preds, targets.float())  # type: ignore[union-attr]

    def _resolve_task(self, targets: Tensor) -> str:
        if self._task_resolved is None:
            self._task_resolved = "regression" if targets.is_floating_point() else "classification"
        return self._task_resolved

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self._active:
            return
        assert self._collector is not None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        preds, targets = self._collector.compute()  # collective under DDP: every rank gets every rank's share
        self._collector.reset()
        self._active = False
        name = _STAGE_NAMES[stage]
        with_ci = self.bootstrap_resamples > 0 and (stage == "test" or self.bootstrap_on_validation)
        report = None
        if trainer.is_global_zero:
            report = self._compute(preds.cpu(), targets.cpu(), with_ci)
        report = broadcast_object(trainer.strategy, report)
        assert report is not None  # rank 0 computed it; the broadcast delivered it to every rank
        self.results[name] = report
        if trainer.is_global_zero:
            self._publish(trainer, name, report)
        if self.log_scalars:
            for key, value in report["scalars"].items():
                if not math.isnan(value):
                    pl_module.log(f"report/{name}_{key}", float(value), on_step=False, on_epoch=True, sync_dist=True)

    def _compute(self, preds: Tensor, targets: Tensor, with_ci: bool) -> dict[str, Any]:
        task = self._task_resolved
        if task == "classification":
            targets = targets.long()
            full = classification_report(preds, targets, self.n_bins)
            report: dict[str, Any] = {
                "task": task,
                "n": full["n"],
                "scalars": full["scalars"],
                "per_class": full["per_class"],
                "confusion_matrix": full["confusion_matrix"],
                "reliability": {k: v for k, v in full["reliability"].items()},
            }
            fn: Callable[[Tensor, Tensor], dict[str, float]] = lambda p, t: fast_classification_scalars(p, t, self.n_bins)  # noqa: E731
        else:
            report = {"task": "regression", "n": int(targets.shape[0]), "scalars": regression_scalars(preds, targets)}
            fn = regression_scalars
        if with_ci:
            report["ci"] = bootstrap_ci(fn, preds, targets, self.bootstrap_resamples, self.confidence, self.seed)
        return report

    def _publish(self, trainer: Any, name: str, report: dict[str, Any]) -> None:
        artifacts = ArtifactLogger(trainer)
        latest = name == "val" and not self.keep_every_epoch  # one replaced set, not 6 new files per epoch
        ci = report.get("ci", {})
        rows = []
        for key, value in report["scalars"].items():
            row: dict[str, Any] = {"metric": key, "value": value}
            if ci:
                row["ci_low"], row["ci_high"] = ci.get(key, (math.nan, math.nan))
            rows.append(row)
        artifacts.log_table(f"evaluation/{name}_metrics", rows, latest=latest)
        self._print_summary(trainer, name, report)
        if report["task"] != "classification":
            return
        c = report["confusion_matrix"].shape[0]
        names = self._names(c)
        per_class = report["per_class"]
        artifacts.log_table(
            f"evaluation/{name}_per_class",
            [{"class": names[i], **{k: per_class[k][i] for k in ("precision", "recall", "f1", "support")}}
             for i in range(c)], latest=latest,
        )
        cm = report["confusion_matrix"]
        artifacts.log_table(
            f"evaluation/{name}_confusion_matrix",
            [{"true": names[i], **{names[j]: int(cm[i, j]) for j in range(c)}} for i in range(c)], latest=latest,
        )
        if self.figures and (name == "test" or self.validation_figures):
            artifacts.log_figure(f"evaluation/{name}_confusion_matrix", plot_confusion_matrix(cm, names, f"{name} confusion matrix"), latest=latest)
            artifacts.log_figure(f"evaluation/{name}_reliability", plot_reliability(report["reliability"]), latest=latest)

    def summary_line(self, name: str, report: dict[str, Any], compact: bool = False) -> str:
        """One line: ``EvaluationReport (<stage>, n=N): metric=value[ (ci_low-ci_high)], ...``."""
        keys = _COMPACT[report["task"]] if compact else list(report["scalars"])
        ci = report.get("ci", {})
        parts = []
        for key in keys:
            text = f"{key}={report['scalars'][key]:.4f}"
            if key in ci and not compact:
                text += f" ({ci[key][0]:.4f}-{ci[key][1]:.4f})"
            parts.append(text)
        return f"EvaluationReport ({name}, n={report['n']}): " + ", ".join(parts)

    def _print_summary(self, trainer: Any, name: str, report: dict[str, Any]) -> None:
        during_fit = trainer.state.fn == "fit"
        if self.summary == "full" or (self.summary in ("end", "compact") and not during_fit):
            rank_zero_info(self.summary_line(name, report))
        elif self.summary == "compact":
            rank_zero_info(self.summary_line(name, report, compact=True))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # summary="end": the last validation report once, when fit is over (not every epoch)
        if self.summary == "end" and "val" in self.results and trainer.is_global_zero:
            rank_zero_info(self.summary_line("val", self.results["val"]))

    def _names(self, c: int) -> list[str]:
        if self.class_names is None:
            return [str(i) for i in range(c)]
        if len(self.class_names) != c:
            raise ValueError(f"class_names has {len(self.class_names)} names but the model predicts {c} classes.")
        return self.class_names


__all__ = [
    "EvaluationReport",
    "bootstrap_ci",
    "classification_report",
    "classification_scalars",
    "fast_classification_scalars",
    "outputs_to_probabilities",
    "plot_confusion_matrix",
    "plot_reliability",
    "regression_scalars",
    "reliability_bins",
]
