"""Curriculum learning: easy samples first, the pool of drawable samples growing with training progress.

Bengio, Louradour, Collobert & Weston, "Curriculum learning", ICML 2009; pacing functions after Hacohen &
Weinshall, "On the power of curriculum learning in training deep networks", ICML 2019; competence-based (root)
pacing after Platanios et al., "Competence-based curriculum learning for neural machine translation", NAACL 2019.

Functional core (plain torch): :func:`pacing_fraction`, :func:`difficulty_ranking`, :func:`curriculum_order`,
:func:`per_sample_losses` and the plain-PyTorch :class:`CurriculumSampler`. Lightning adapter:
:class:`CurriculumLearning`, which steers the train sampler through the shared
:class:`~lightning_techniques._internal.sampling.SamplerSteering` mechanism (DDP-correct, exact mid-epoch resume).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_techniques._internal.batch import get_inputs, get_targets
from lightning_techniques._internal.distributed import broadcast_object
from lightning_techniques._internal.sampling import SteeringCallback
from lightning_techniques._internal.schedule import interpolate
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_choice, check_number, check_positive
from lightning_techniques.data.labels import find_labels

Pacing = Literal["linear", "root", "geometric", "step"]
Scorer = Literal["self_paced", "teacher"]
PACINGS: tuple[str, ...] = ("linear", "root", "geometric", "step")
SCORERS: tuple[str, ...] = ("self_paced", "teacher")

PacingFn = Callable[[int, int], float]
LossFn = Callable[[nn.Module, Any], Tensor]


# ----------------------------------------------------------------------------------------------- functional core
def pacing_fraction(
    t: int | float,
    total: int | float,
    start_fraction: float = 0.2,
    kind: str | PacingFn = "linear",
    stages: int = 4,
) -> float:
    """Fraction of the difficulty-sorted data in the pool at progress ``t`` (steps or epochs) of ``total``.

    With ``x = t / total`` and ``s = start_fraction`` (the fraction is 1 for ``t >= total``):

    * ``"linear"``: ``s + (1 - s) x``
    * ``"root"``: ``sqrt(s^2 + (1 - s^2) x)`` - Platanios et al. 2019's square-root competence;
    * ``"geometric"``: ``s (1/s)^x`` - exponential growth (Hacohen & Weinshall 2019's exponential pacing, smooth);
    * ``"step"``: ``s + (1 - s) floor(x stages) / stages`` - ``stages`` equal jumps (``stages=1``: single step);
    * a callable ``kind(t, total) -> fraction`` (clipped to [0, 1]).
    """
    if total <= 0 or t >= total:
        return 1.0
    x = max(float(t), 0.0) / float(total)
    s = float(start_fraction)
    if callable(kind):
        value = float(kind(int(t), int(total)))
        if not math.isfinite(value):
            raise ValueError(f"the pacing callable returned {value!r} at t={t}; it must return a finite fraction.")
        return min(max(value, 0.0), 1.0)
    if kind not in PACINGS:
        raise ValueError(f"pacing={kind!r} is not allowed; choose one of {list(PACINGS)} or pass a callable.")
    shape = "exponential" if kind == "geometric" else kind  # geometric growth s (1/s)^x
    value = interpolate(s, 1.0, x, shape, stages=stages)
    return min(max(value, s), 1.0)


def difficulty_ranking(scores: Tensor | Sequence[float], anti: bool = False, labels: Tensor | None = None) -> Tensor:
    """Dataset indices sorted from easiest (lowest score) to hardest; ``anti=True`` reverses (hardest first).
    Ties keep index order (stable), so the ranking is the same on every rank and every run.

    With ``labels`` the ranking is class-balanced: samples are ordered by their difficulty quantile *within their
    class* (``(rank in class + 0.5) / class size``), so any prefix of the ranking holds (about) the same fraction of
    every class - a pool of the easiest 20 % then holds the easiest 20 % of each class, not only the easy classes.
    """
    values = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(values).all():
        bad = torch.nonzero(~torch.isfinite(values)).flatten()[:5].tolist()
        raise ValueError(f"difficulty scores must be finite; samples {bad} are not.")
    order = torch.sort(values, descending=anti, stable=True).indices
    if labels is None:
        return order
    labels = torch.as_tensor(labels).long().reshape(-1)
    if len(labels) != len(values):
        raise ValueError(f"labels has {len(labels)} entries for {len(values)} scores.")
    quantile = torch.empty(len(values), dtype=torch.float64)
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]  # the class's samples, easiest first
        quantile[members] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    # sort by quantile; ties (same quantile) by the original difficulty order
    position = torch.empty(len(values), dtype=torch.long)
    position[order] = torch.arange(len(values))
    key = quantile * (len(values) + 1) + position.double() / (len(values) + 1)
    return torch.sort(key, stable=True).indices


def curriculum_order(
    ranked: Tensor,
    epoch_size: int,
    batch_size: int,
    pool_size: Callable[[int], int],
    generator: torch.Generator,
) -> Tensor:
    """One epoch of a curriculum: ``epoch_size`` dataset indices, batch ``k`` drawn from the ``pool_size(k)``
    easiest samples of ``ranked``.

    Within the pool, samples are drawn without replacement in a shuffled order; when the pool grows, the samples
    not yet drawn and the newly admitted ones are shuffled together; only when the whole pool has been drawn does
    a fresh shuffle of the pool start (so a pool smaller than the epoch is cycled through evenly).
    """
    n = len(ranked)
    if n == 0:
        raise ValueError("the dataset is empty.")
    out = torch.empty(epoch_size, dtype=torch.long)
    perm = torch.empty(0, dtype=torch.long)
    cursor, current, filled, k = 0, 0, 0, 0
    while filled < epoch_size:
        p = min(max(int(pool_size(k)), 1), n)
        if p != current:
            rest = perm[cursor:]
            if p > current:
                rest = torch.cat([rest, torch.arange(current, p)])
            else:
                rest = rest[rest < p]
                if len(rest) == 0:
                    rest = torch.arange(p)
            perm = rest[torch.randperm(len(rest), generator=generator)]
            cursor, current = 0, p
        need = min(batch_size, epoch_size - filled)
        while need:
            if cursor >= len(perm):
                perm = torch.randperm(current, generator=generator)
                cursor = 0
            take = min(need, len(perm) - cursor)
            out[filled : filled + take] = ranked[perm[cursor : cursor + take]]
            cursor, filled, need = cursor + take, filled + take, need - take
        k += 1
    return out


def default_loss_fn(model: nn.Module, batch: Any) -> Tensor:
    """Per-sample cross-entropy of ``model(inputs)`` against the batch's targets."""
    return F.cross_entropy(model(get_inputs(batch)), get_targets(batch), reduction="none")


@torch.no_grad()
def per_sample_losses(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    loss_fn: LossFn | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The loss of every sample of ``dataset`` under ``model`` (eval mode, no grad), as a float64 CPU tensor.

    ``loss_fn(model, batch)`` must return one loss per sample (default: cross-entropy against the batch target).
    The model's train/eval mode is restored afterwards.
    """
    loss_fn = loss_fn or default_loss_fn
    if device is None:
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    out = []
    try:
        for batch in loader:
            batch = tree_map(lambda v: v.to(device) if isinstance(v, Tensor) else v, batch)
            losses = torch.as_tensor(loss_fn(model, batch)).reshape(-1)
            out.append(losses.detach().to("cpu", torch.float64))
    finally:
        for module, mode in modes:
            module.training = mode
    scores = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    if len(scores) != len(dataset):  # type: ignore[arg-type]
        raise ValueError(f"loss_fn returned {len(scores)} losses for {len(dataset)} samples; it must return one "  # type: ignore[arg-type]
                         "loss per sample (reduction='none').")
    return scores


def scores_from_fn(dataset: Dataset, difficulty_fn: Callable[[Any], float]) -> Tensor:
    """``difficulty_fn(dataset[i])`` for every sample, as a float64 tensor (one pass over the dataset)."""
    values = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        value = difficulty_fn(dataset[i])
        values.append(float(value.item() if isinstance(value, Tensor) else value))
    return torch.tensor(values, dtype=torch.float64)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


class CurriculumSampler(Sampler[int]):
    """Plain-PyTorch curriculum sampler (no Lightning): epoch-paced pool of the easiest samples, shuffled.

    Epoch ``e`` yields ``len(scores)`` indices drawn (see :func:`curriculum_order`) from the
    ``pacing_fraction(e, full_at_epoch)`` easiest samples. Call ``set_epoch(e)`` every epoch. For Lightning use
    :class:`CurriculumLearning` (step pacing, DDP, resume).

    Args:
        scores: per-sample difficulty (lower is easier).
        full_at_epoch: epoch from which the whole dataset is drawn.
        start_fraction, pacing, stages, anti_curriculum: as in :class:`CurriculumLearning`.
        seed: shuffling seed (the order depends only on ``seed`` and the epoch).

    Example::

        loader = DataLoader(ds, batch_size=64, sampler=CurriculumSampler(scores, full_at_epoch=5))
    """

    def __init__(self, scores: Sequence[float] | Tensor, full_at_epoch: int, start_fraction: float = 0.2,
                 pacing: str | PacingFn = "linear", stages: int = 4, anti_curriculum: bool = False, seed: int = 0):
        check_positive("full_at_epoch", full_at_epoch, integer=True)
        check_number("start_fraction", start_fraction, low=0.0, high=1.0, low_inclusive=False)
        if not callable(pacing):
            check_choice("pacing", pacing, PACINGS)
        self.ranked = difficulty_ranking(scores, anti_curriculum)
        self.full_at_epoch, self.start_fraction, self.pacing = full_at_epoch, start_fraction, pacing
        self.stages, self.seed, self.epoch = stages, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        n = len(self.ranked)
        frac = pacing_fraction(self.epoch, self.full_at_epoch, self.start_fraction, self.pacing, self.stages)
        pool = max(1, math.ceil(frac * n))
        order = curriculum_order(self.ranked, n, n, lambda _k: pool, _epoch_generator(self.seed, self.epoch))
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self.ranked)


# ----------------------------------------------------------------------------------------------- Lightning adapter
class CurriculumLearning(SteeringCallback):
    """Curriculum learning for a stock Trainer: the train loader draws from the easiest samples first, and the pool
    grows with training progress according to a pacing function until it holds the whole training set.

    Bengio et al., "Curriculum learning", ICML 2009; pacing functions after Hacohen & Weinshall, ICML 2019;
    the ``"root"`` pacing is Platanios et al.'s competence function (NAACL 2019).

    Samples are ranked by difficulty (lower is easier) from one of:

    * ``difficulty=[...]``: a per-sample array (list / tensor / ndarray, one value per training sample);
    * ``difficulty_fn=f``: ``f(dataset[i]) -> float``, evaluated once over the training set;
    * ``difficulty="self_paced"``: the current model's per-sample loss, re-scored every ``rescore_every_n_epochs``
      epochs (at the start of the epoch; the first scoring uses the initial model);
    * ``difficulty="teacher"``: the per-sample loss of the model with the weights of ``teacher_checkpoint``
      (transfer scoring; scored once). The checkpoint must fit the module (same architecture); it is loaded with
      ``weights_only=True``.

    Batch ``k`` of the run is drawn from the ``ceil(fraction(t) * N)`` easiest samples, ``t`` being the optimizer
    step of that batch (``pace_by="step"``) or the epoch (``pace_by="epoch"``), shuffled within the pool
    (without replacement until the pool is exhausted). An epoch keeps the training set's length. The train
    sampler is steered through the shared ``SamplerSteering`` mechanism: under DDP every rank draws a disjoint
    share of each global batch of the *same* curriculum order (Lightning's re-permuting sampler wrapper is not
    used), ``reload_dataloaders_every_n_epochs`` is not needed, and a checkpoint taken mid-epoch resumes with the
    same pool, permutation and position. Scores, the epoch's start step and the resolved pacing length are part of
    the callback's checkpoint state. Self-paced and teacher scores are computed on rank 0 and broadcast. The
    current pool fraction is logged as ``curriculum/pool_fraction`` at the Trainer's ``log_every_n_steps`` cadence
    (and on the run's last step).

    Args:
        difficulty: per-sample scores, or ``"self_paced"`` / ``"teacher"``.
        difficulty_fn: ``f(sample) -> float`` (instead of ``difficulty``).
        pacing: ``"linear"``, ``"root"``, ``"geometric"``, ``"step"`` or a callable ``f(t, full_at) -> fraction``.
        start_fraction: fraction of the (easiest) data in the pool at the start, in (0, 1].
        full_at: step (or epoch) from which the whole set is drawn; default ``full_at_fraction`` of the run
            (from ``max_steps``, else ``max_epochs``), fixed at the first epoch and kept across resume.
        full_at_fraction: see ``full_at``.
        pace_by: ``"step"`` (optimizer steps) or ``"epoch"``.
        stages: number of jumps of the ``"step"`` pacing.
        anti_curriculum: rank hardest first.
        balance_classes: rank by difficulty quantile within each class (labels found like the class-imbalance
            techniques do), so the pool holds the same fraction of every class (see :func:`difficulty_ranking`).
        rescore_every_n_epochs: re-scoring period of ``"self_paced"``.
        teacher_checkpoint: Lightning checkpoint (``state_dict`` key) or plain state dict for ``"teacher"``.
        loss_fn: ``loss_fn(module, batch) -> per-sample losses`` for model scoring (default cross-entropy of
            ``module(inputs)`` against the batch target).
        score_batch_size: batch size of model scoring.
        seed: shuffling seed (the order depends only on it, the epoch and the scores).
        log: log the pool fraction with ``pl_module.log`` (``False``: log nothing).

    Example::

        trainer = L.Trainer(max_steps=300, callbacks=[CurriculumLearning(difficulty=scores, pacing="root",
                                                                         start_fraction=0.2, full_at=150)])
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: one technique per run may steer the train sampler (not together with :class:`Oversampling`); needs a
    map-style dataset and a single ``DataLoader`` built with ``batch_size`` (no custom ``batch_sampler``); the
    pacing step of a batch assumes a constant ``accumulate_grad_batches``; a pool fraction below one global batch
    repeats samples within a step; model scoring reads the whole training set once per scoring (on rank 0).
    """

    takes_over: frozenset[str] = frozenset({"train_sampler"})
    conflicts_with: tuple[str, ...] = ("Oversampling",)  # one sampler steerer per run (also: "train_sampler" is exclusive)

    def __init__(
        self,
        difficulty: Sequence[float] | Tensor | Scorer | None = None,
        difficulty_fn: Callable[[Any], float] | None = None,
        pacing: Pacing | PacingFn = "linear",
        start_fraction: float = 0.2,
        full_at: int | None = None,
        full_at_fraction: float = 0.5,
        pace_by: Literal["step", "epoch"] = "step",
        stages: int = 4,
        anti_curriculum: bool = False,
        balance_classes: bool = False,
        rescore_every_n_epochs: int = 1,
        teacher_checkpoint: str | Path | None = None,
        loss_fn: LossFn | None = None,
        score_batch_size: int = 256,
        seed: int = 0,
        log: bool = True,
    ) -> None:
        sources = (difficulty is not None) + (difficulty_fn is not None)
        if sources != 1:
            raise ValueError(
                "CurriculumLearning needs exactly one difficulty source: difficulty=<per-sample scores | "
                f"'self_paced' | 'teacher'> or difficulty_fn=<callable>; got {sources}."
            )
        if isinstance(difficulty, str):
            check_choice("difficulty", difficulty, SCORERS)
        elif difficulty is not None:
            try:
                values = torch.as_tensor(difficulty, dtype=torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError) as err:
                raise TypeError(f"difficulty must be a 1-D sequence of numbers or one of {list(SCORERS)} ({err}).") from None
            if len(values) == 0 or not torch.isfinite(values).all():
                raise ValueError("difficulty must be a non-empty sequence of finite numbers (one per sample).")
        if difficulty_fn is not None and not callable(difficulty_fn):
            raise TypeError(f"difficulty_fn must be callable, got {type(difficulty_fn).__name__}.")
        if difficulty == "teacher" and teacher_checkpoint is None:
            raise ValueError("difficulty='teacher' needs teacher_checkpoint=<path to a checkpoint of the model>.")
        if teacher_checkpoint is not None and difficulty != "teacher":
            raise ValueError("teacher_checkpoint is only used with difficulty='teacher'.")
        if not callable(pacing):
            check_choice("pacing", pacing, PACINGS)
        check_number("start_fraction", start_fraction, low=0.0, high=1.0, low_inclusive=False)
        if full_at is not None:
            check_positive("full_at", full_at, integer=True)
        check_number("full_at_fraction", full_at_fraction, low=0.0, high=1.0, low_inclusive=False)
        check_choice("pace_by", pace_by, ["step", "epoch"])
        check_positive("stages", stages, integer=True)
        check_positive("rescore_every_n_epochs", rescore_every_n_epochs, integer=True)
        check_positive("score_batch_size", score_batch_size, integer=True)
        check_number("seed", seed, integer=True)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
        self.difficulty = difficulty
        self.difficulty_fn = difficulty_fn
        self.pacing = pacing
        self.start_fraction = start_fraction
        self.full_at = full_at
        self.full_at_fraction = full_at_fraction
        self.pace_by = pace_by
        self.stages = stages
        self.anti_curriculum = anti_curriculum
        self.balance_classes = balance_classes
        self.rescore_every_n_epochs = rescore_every_n_epochs
        self.teacher_checkpoint = None if teacher_checkpoint is None else str(teacher_checkpoint)
        self.loss_fn = loss_fn
        self.score_batch_size = score_batch_size
        self.seed = seed
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        # state (checkpointed)
        self.scores: Tensor | None = None  # computed scores (difficulty_fn / self_paced / teacher)
        self.scored_epoch = -1
        self.epoch_start: list[int] = [-1, 0]  # [epoch, batches done before it]
        self.batches_done = 0
        self.full_at_resolved: int | None = None
        self.accumulate_resolved: int | None = None  # accumulate_grad_batches the pacing assumes, fixed at first use
        self.pool_fraction = float("nan")
        # run objects
        self._trainer: Any = None
        self._module: Any = None
        self._collate_fn: Any = None
        self._dataset: Dataset | None = None
        self._labels: Tensor | None = None
        self._steps_per_epoch = 1
        self._accumulate = 1

    # -- setup ----------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher_checkpoint is not None and not Path(self.teacher_checkpoint).is_file():
            raise FileNotFoundError(f"CurriculumLearning: teacher_checkpoint={self.teacher_checkpoint!r} does not exist.")
        self._trainer, self._module = trainer, pl_module
        super().setup(trainer, pl_module, stage)  # conflicts refused, the sampler steered

    def _plan_factory(self, dataset: Dataset, loader: DataLoader) -> tuple[Callable[[int], Sequence[int]], int]:
        trainer = self._trainer
        n = len(dataset)  # type: ignore[arg-type]
        if self.difficulty is not None and not isinstance(self.difficulty, str):
            given = torch.as_tensor(self.difficulty, dtype=torch.float64).reshape(-1)
            if len(given) != n:
                raise ValueError(f"CurriculumLearning: difficulty has {len(given)} scores but the training set has "
                                 f"{n} samples.")
        self._dataset = dataset
        self._collate_fn = loader.collate_fn
        self._labels = find_labels(dataset) if self.balance_classes else None
        batch_size = int(loader.batch_size)  # type: ignore[arg-type]
        world = int(trainer.world_size)
        global_batch = batch_size * world
        per_rank = math.ceil(n / world)
        batches = per_rank // batch_size if loader.drop_last else math.ceil(per_rank / batch_size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif isinstance(limit, float) and limit < 1.0:
            batches = max(1, int(batches * limit))
        if self.accumulate_resolved is None:
            # fixed once (and checkpointed): a resumed run, whose Trainer may already hold a scheduled factor when the
            # loader is built, must pace exactly as the straight run did
            self.accumulate_resolved = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        self._accumulate = self.accumulate_resolved
        self._steps_per_epoch = max(1, math.ceil(batches / self._accumulate))
        if self.difficulty_fn is not None and (self.scores is None or len(self.scores) != n):
            scores = scores_from_fn(dataset, self.difficulty_fn) if trainer.is_global_zero else None
            self.scores = broadcast_object(trainer.strategy, scores)

        def plan(epoch: int) -> Sequence[int]:
            return self._plan(epoch, n, global_batch).tolist()

        return plan, n

    def _resolve_full_at(self) -> int:
        if self.full_at is not None:
            return self.full_at
        if self.full_at_resolved is None:
            trainer = self._trainer
            max_steps = int(getattr(trainer, "max_steps", -1) or -1)
            max_epochs = getattr(trainer, "max_epochs", None)
            if self.pace_by == "step":
                total = max_steps if max_steps > 0 else int(max_epochs or 1) * self._steps_per_epoch
            else:
                total = int(max_epochs) if max_epochs and max_epochs > 0 else math.ceil(max_steps / self._steps_per_epoch)
            self.full_at_resolved = max(1, round(self.full_at_fraction * max(total, 1)))
        return self.full_at_resolved

    def _fraction(self, t: int) -> float:
        return pacing_fraction(t, self._resolve_full_at(), self.start_fraction, self.pacing, self.stages)

    def _plan(self, epoch: int, n: int, global_batch: int) -> Tensor:
        scores = self._scores_for(epoch, n)
        ranked = difficulty_ranking(scores, self.anti_curriculum, self._labels)
        if self.epoch_start[0] != epoch:
            self.epoch_start = [int(epoch), int(self.batches_done)]
        start = self.epoch_start[1]
        if self.pace_by == "epoch":
            pool = max(1, math.ceil(self._fraction(epoch) * n))

            def pool_size(k: int) -> int:
                return pool
        else:

            def pool_size(k: int) -> int:
                return max(1, math.ceil(self._fraction((start + k) // self._accumulate) * n))

        return curriculum_order(ranked, n, global_batch, pool_size, _epoch_generator(self.seed, epoch))

    # -- scoring ----------------------------------------------------------------------------------------------
    def _scores_for(self, epoch: int, n: int) -> Tensor:
        if self.difficulty_fn is not None:
            assert self.scores is not None
            return self.scores
        if not isinstance(self.difficulty, str):
            return torch.as_tensor(self.difficulty, dtype=torch.float64).reshape(-1)
        due = self.scores is None or len(self.scores) != n
        if self.difficulty == "self_paced" and not due:
            due = self.scored_epoch != epoch and epoch - self.scored_epoch >= self.rescore_every_n_epochs
        if due:
            trainer = self._trainer
            scores = self._score_with_model() if trainer.is_global_zero else None
            self.scores = broadcast_object(trainer.strategy, scores)
            self.scored_epoch = int(epoch)
        assert self.scores is not None
        return self.scores

    def _score_with_model(self) -> Tensor:
        module, dataset = self._module, self._dataset
        assert module is not None and dataset is not None
        if self.difficulty == "teacher":
            assert self.teacher_checkpoint is not None
            teacher = torch.load(self.teacher_checkpoint, map_location="cpu", weights_only=True)
            teacher = teacher.get("state_dict", teacher) if isinstance(teacher, dict) else teacher
            if not isinstance(teacher, dict):
                raise TypeError(f"teacher_checkpoint={self.teacher_checkpoint!r} holds no state dict.")
            own = {k: v.detach().clone() for k, v in module.state_dict().items()}
            try:
                module.load_state_dict(teacher, strict=True)
            except RuntimeError as err:
                raise ValueError(f"teacher_checkpoint={self.teacher_checkpoint!r} does not fit "
                                 f"{type(module).__name__}: {err}") from None
            try:
                return self._losses(module, dataset)
            finally:
                module.load_state_dict(own, strict=True)
        return self._losses(module, dataset)

    def _losses(self, module: nn.Module, dataset: Dataset) -> Tensor:
        return per_sample_losses(module, dataset, self.score_batch_size, self.loss_fn, self._collate_fn)

    # -- progress ---------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._dataset is None:
            return
        if self.pace_by == "epoch":
            t = trainer.current_epoch
        else:
            t = self.batches_done // self._accumulate
        self.pool_fraction = self._fraction(t)
        self.batches_done += 1
        if self._log_enabled:
            log_step_metrics(pl_module, {"curriculum/pool_fraction": self.pool_fraction})

    # -- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler_state()
        return {
            "scores": self.scores,
            "scored_epoch": self.scored_epoch,
            "epoch_start": list(self.epoch_start),
            "batches_done": self.batches_done,
            "full_at_resolved": self.full_at_resolved,
            "accumulate_resolved": self.accumulate_resolved,
            "sampler": sampler,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scores = state_dict.get("scores")
        self.scored_epoch = int(state_dict.get("scored_epoch", -1))
        self.epoch_start = [int(v) for v in state_dict.get("epoch_start", [-1, 0])]
        self.batches_done = int(state_dict.get("batches_done", 0))
        self.full_at_resolved = state_dict.get("full_at_resolved")
        self.accumulate_resolved = state_dict.get("accumulate_resolved", self.accumulate_resolved)
        self.load_sampler_state(state_dict.get("sampler"))
