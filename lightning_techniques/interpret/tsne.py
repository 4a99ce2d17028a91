"""t-SNE of a model's penultimate-layer embeddings, coloured by label (van der Maaten & Hinton, "Visualizing Data
using t-SNE", JMLR 2008), with scikit-learn's ``TSNE`` on a bounded number of samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_techniques._internal.artifacts import ArtifactLogger
from lightning_techniques._internal.batch import get_targets
from lightning_techniques._internal.eval_stages import EvaluationCallback
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_number, check_positive


def default_embedding_layer(model: nn.Module) -> str:
    """Qualified name of the last ``nn.Linear`` of ``model`` (its input is the penultimate embedding)."""
    linears = [name for name, m in model.named_modules() if name and isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer to take the penultimate embedding from; pass layer=... "
            f"naming one of {[n for n, _ in model.named_modules() if n]}."
        )
    return linears[-1]


def resolve_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Module]:
    """``(name, module)`` for ``layer`` (default :func:`default_embedding_layer`); a clear error when missing."""
    name = default_embedding_layer(model) if layer is None else layer
    modules = dict(model.named_modules())
    if name not in modules:
        linears = [n for n, m in modules.items() if n and isinstance(m, nn.Linear)]
        raise ValueError(
            f"layer {name!r} is not in {type(model).__name__}. Its Linear layers are {linears}; all layers: "
            f"{[n for n in modules if n]}."
        )
    return name, modules[name]


class EmbeddingCapture:
    """Context manager keeping, for every call of ``layer``, its input (``use_input=True``: the embedding that a
    final Linear layer maps to logits) or its output, flattened to ``[B, features]``, detached, on the CPU."""

    def __init__(self, layer: nn.Module, use_input: bool = True) -> None:
        self.layer = layer
        self.use_input = use_input
        self.features: list[Tensor] = []
        self._handle: Any = None

    def _keep(self, tensor: Any) -> None:
        if isinstance(tensor, (tuple, list)):
            tensor = tensor[0] if tensor else None
        if isinstance(tensor, Tensor) and tensor.ndim >= 1:
            self.features.append(tensor.detach().reshape(tensor.shape[0], -1).float().cpu())

    def __enter__(self) -> EmbeddingCapture:
        if self.use_input:
            self._handle = self.layer.register_forward_pre_hook(lambda _m, args: self._keep(args))
        else:
            self._handle = self.layer.register_forward_hook(lambda _m, _i, out: self._keep(out))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@torch.no_grad()
def embeddings(model: nn.Module, inputs: Tensor, layer: str | None = None, use_input: bool = True) -> Tensor:
    """``[N, features]`` embedding of ``inputs`` at ``layer`` (default: input of the last Linear layer)."""
    _, module = resolve_layer(model, layer)
    with EmbeddingCapture(module, use_input) as capture:
        model(inputs)
    if not capture.features:
        raise RuntimeError("the embedding layer was not called by the model's forward pass.")
    return capture.features[0]


def tsne_embedding(features: Tensor | np.ndarray, perplexity: float = 30.0, seed: int = 0, max_iter: int = 500) -> np.ndarray:
    """2-D t-SNE of ``features [N, D]`` (scikit-learn, PCA initialisation, Barnes-Hut); the perplexity is lowered
    to ``(N - 1) / 3`` when there are too few samples for it."""
    manifold = require("sklearn.manifold", "interpret", "t-SNE")
    x = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 samples, got {n}.")
    perplexity = float(min(perplexity, (n - 1) / 3.0))
    model = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                          max_iter=max(250, int(max_iter)), random_state=seed, method="barnes_hut", n_jobs=1)
    threadpoolctl = require("threadpoolctl", "interpret", "t-SNE")  # a scikit-learn dependency
    # one OpenMP thread: on a few shared cores sklearn's Barnes-Hut is ~8x slower with the default thread count
    with threadpoolctl.threadpool_limits(limits=1):
        return model.fit_transform(x).astype(np.float32)


def knn_accuracy(points: Tensor | np.ndarray, labels: Tensor | np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (majority vote) of ``labels`` in the space of ``points`` -
    how well an embedding separates the classes (chance: the frequency of the commonest class)."""
    p = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels)).long()
    d = torch.cdist(p, p)
    d.fill_diagonal_(float("inf"))
    neighbours = y[d.topk(k, largest=False).indices]
    votes = torch.nn.functional.one_hot(neighbours, int(y.max()) + 1).sum(dim=1)
    return float((votes.argmax(dim=1) == y).double().mean())


def plot_embedding(points: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
                   title: str = "") -> Any:
    """A matplotlib Figure: 2-D points coloured by label, with a legend (and the class index at each centroid)."""
    figure_mod = require("matplotlib.figure", "interpret", "t-SNE figures")
    mpl = require("matplotlib", "interpret", "t-SNE figures")
    labels = np.asarray(labels).astype(int)
    classes = np.unique(labels)
    cmap = mpl.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    fig = figure_mod.Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(classes):
        sel = labels == c
        name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
        ax.scatter(points[sel, 0], points[sel, 1], s=8, color=cmap(i % cmap.N), label=name, alpha=0.8)
        centre = points[sel].mean(axis=0)
        ax.text(centre[0], centre[1], name, fontsize=9, weight="bold", ha="center", va="center")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, markerscale=1.5, loc="best", ncol=2)
    ax.set_title(title or "t-SNE")
    return fig


class TSNELogger(EvaluationCallback):
    """Logs a t-SNE map (van der Maaten & Hinton, JMLR 2008) of the model's penultimate-layer embeddings coloured by
    label every N validation epochs and at test end, plus TensorBoard's embedding projector when TensorBoard is
    attached.

    The embedding is captured with a forward pre-hook on ``layer`` (default: the last ``nn.Linear``, whose input is
    the penultimate embedding) during the module's own evaluation forward passes - no extra forward, and the outputs
    are unchanged. The first ``max_samples`` samples of the epoch (rank 0's share under DDP) are kept with their
    labels; at the epoch's end rank 0 runs scikit-learn's t-SNE on them (other ranks do nothing: no collective).
    Writes ``tsne/<val|test>`` (figure), ``tsne/<val|test>_points`` and ``_labels`` (arrays) and, with a
    TensorBoardLogger, ``add_embedding`` of the raw embeddings. ``self.last`` holds the last ``points``, ``labels``
    and ``knn_accuracy`` (leave-one-out 5-NN accuracy in the 2-D map: how well the classes separate).

    Args:
        layer: qualified name of the layer (default: the last ``nn.Linear``).
        use_layer_input: take the layer's input (default, the penultimate embedding) or its output.
        every_n_val_epochs: log every N-th validation epoch (0: never during fit). The default keeps the cost
            under 10% of training time on the demo, whose epochs are very short (one t-SNE of 300 samples
            costs ~2-3 epochs of the demo transformer; see ``benchmarks/RESULTS.md``): lower it for real models.
        on_test: also log at test end.
        max_samples: samples embedded (t-SNE costs grow ~N log N; 300 take about a second on one CPU core).
        perplexity: t-SNE perplexity (lowered automatically for few samples).
        max_iter: t-SNE iterations (>= 250).
        seed: t-SNE random state.
        projector: write TensorBoard's projector embedding when a TensorBoardLogger is attached.
        class_names: legend names of the classes.
        target_key: where the label is in a dict/tuple batch (default element 1 or a known key).

    Example::

        trainer = L.Trainer(callbacks=[TSNELogger(every_n_val_epochs=20)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: needs integer class labels in the batch for colouring; the map shows only rank 0's share of the
    evaluation set under DDP; t-SNE distances between clusters carry little meaning (Wattenberg et al. 2016).
    """

    def __init__(
        self,
        layer: str | None = None,
        use_layer_input: bool = True,
        every_n_val_epochs: int = 50,
        on_test: bool = True,
        max_samples: int = 300,
        perplexity: float = 30.0,
        max_iter: int = 500,
        seed: int = 0,
        projector: bool = True,
        class_names: list[str] | None = None,
        target_key: str | int | None = None,
    ) -> None:
        if layer is not None and not isinstance(layer, str):
            raise TypeError(f"layer must be a qualified layer name (str), got {layer!r}.")
        check_number("every_n_val_epochs", every_n_val_epochs, low=0, integer=True)
        check_number("max_samples", max_samples, low=4, integer=True)
        check_positive("perplexity", perplexity)
        check_number("max_iter", max_iter, low=250, integer=True)
        if class_names is not None and (isinstance(class_names, str) or not all(isinstance(c, str) for c in class_names)):
            raise TypeError(f"class_names must be a list of strings, got {class_names!r}.")
        self.layer = layer
        self.use_layer_input = use_layer_input
        self.every_n_val_epochs = every_n_val_epochs
        self.on_test = on_test
        self.max_samples = max_samples
        self.perplexity = perplexity
        self.max_iter = max_iter
        self.seed = seed
        self.projector = projector
        self.class_names = list(class_names) if class_names is not None else None
        self.target_key = target_key
        super().__init__()  # val_epochs_seen
        self.last: dict[str, Any] = {}
        self._capture: EmbeddingCapture | None = None
        self._features: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._layer_name: str | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        require("sklearn.manifold", "interpret", "TSNELogger")
        require("matplotlib", "interpret", "TSNELogger")
        self._layer_name, _ = resolve_layer(pl_module, self.layer)

    def _collected(self) -> int:
        return sum(t.shape[0] for t in self._labels)

    def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._stop()
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        if stage == "test":
            active = self.on_test
        elif trainer.state.fn != "fit":
            active = True
        else:
            active = self.validation_due(trainer)
        if active:
            _, module = resolve_layer(pl_module, self._layer_name)
            self._capture = EmbeddingCapture(module, self.use_layer_input).__enter__()

    def _batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        if self._capture is not None:
            self._capture.features = []

    def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                   stage: str) -> None:
        if self._capture is None:
            return
        labels = get_targets(batch, self.target_key).detach().cpu()
        n = labels.shape[0]
        matching = [f for f in self._capture.features if f.shape[0] == n]
        self._capture.features = []
        if not matching:
            raise RuntimeError(f"TSNELogger: layer {self._layer_name!r} was not called with this batch's {n} samples.")
        take = self.max_samples - self._collected()
        self._features.append(matching[0][:take])
        self._labels.append(labels[:take])
        if self._collected() >= self.max_samples:  # enough: stop hooking for the rest of the epoch
            self._capture.remove()
            self._capture = None

    def _stop(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        self._features, self._labels = [], []

    def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
        features, labels = self._features, self._labels
        self._stop()
        if not features:
            return
        x = torch.cat(features)
        y = torch.cat(labels)
        points = tsne_embedding(x, self.perplexity, self.seed, self.max_iter)
        score = knn_accuracy(points, y.numpy())
        self.last = {"points": points, "labels": y.numpy(), "knn_accuracy": score, "stage": stage}
        name = "val" if stage == "validate" else "test"
        artifacts = ArtifactLogger(trainer)
        title = f"t-SNE of {self._layer_name} {'input' if self.use_layer_input else 'output'} ({name}, step " \
                f"{trainer.global_step}; 5-NN acc {score:.2f})"
        artifacts.log_figure(f"tsne/{name}", plot_embedding(points, y.numpy(), self.class_names, title))
        artifacts.log_array(f"tsne/{name}_points", points)
        artifacts.log_array(f"tsne/{name}_labels", y.numpy())
        if self.projector:
            for logger in getattr(trainer, "loggers", []) or []:
                if type(logger).__name__ == "TensorBoardLogger":
                    metadata = [self.class_names[i] if self.class_names else str(i) for i in y.tolist()]
                    logger.experiment.add_embedding(x, metadata=metadata, global_step=trainer.global_step,
                                                    tag=f"embedding_{name}")
        rank_zero_info(f"TSNELogger ({name}): {len(y)} samples, 5-NN accuracy in the map {score:.3f}")


__all__ = ["EmbeddingCapture", "TSNELogger", "default_embedding_layer", "embeddings", "knn_accuracy", "plot_embedding",
           "tsne_embedding"]
