"""Curriculum learning: pacing/ordering core, the sampler's effect on a stock Trainer, scoring, resume, DDP, errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import CurriculumLearning, CurriculumSampler, Oversampling
from lightning_techniques.data.curriculum import (
    curriculum_order,
    difficulty_ranking,
    pacing_fraction,
    per_sample_losses,
)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.demo.data import LabeledTensorDataset
from lightning_techniques.testing import assert_exact_resume, assert_ranks_agree, run_ddp_script

DDP_SCRIPT = Path(__file__).parent / "ddp" / "ddp_data.py"


class RecordingDataset(LabeledTensorDataset):
    """Records every index the loader reads (num_workers=0: in sampler order)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        super().__init__(inputs, targets)
        self.seen: list[int] = []

    def __getitem__(self, index: int):
        self.seen.append(int(index))
        return super().__getitem__(index)


class RecordingDigits(DigitsDataModule):
    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not isinstance(self.train_dataset, RecordingDataset):
            self.train_dataset = RecordingDataset(self.train_dataset.inputs, self.train_dataset.targets)


def _trainer(**kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


def _scores(n: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ functional core
def test_pacing_functions_match_their_formulas() -> None:
    s, T = 0.2, 100
    assert pacing_fraction(0, T, s, "linear") == pytest.approx(0.2)
    assert pacing_fraction(50, T, s, "linear") == pytest.approx(0.6)
    assert pacing_fraction(25, T, s, "root") == pytest.approx(math.sqrt(0.04 + 0.96 * 0.25))
    assert pacing_fraction(50, T, s, "geometric") == pytest.approx(0.2**0.5)
    assert pacing_fraction(0, T, s, "geometric") == pytest.approx(0.2)
    assert pacing_fraction(49, T, s, "step", stages=2) == pytest.approx(0.2)
    assert pacing_fraction(50, T, s, "step", stages=2) == pytest.approx(0.6)
    for kind in ("linear", "root", "geometric", "step"):
        assert pacing_fraction(T, T, s, kind) == 1.0
        assert pacing_fraction(10 * T, T, s, kind) == 1.0
        values = [pacing_fraction(t, T, s, kind) for t in range(T + 1)]
        assert all(a <= b for a, b in zip(values, values[1:])), kind  # monotone
    assert pacing_fraction(30, T, s, lambda t, total: t / total) == pytest.approx(0.3)
    assert pacing_fraction(30, T, s, lambda t, total: 7.0) == 1.0  # clipped
    with pytest.raises(ValueError, match="pacing='cubic'"):
        pacing_fraction(1, T, s, "cubic")


def test_difficulty_ranking_is_stable_and_reversible() -> None:
    scores = [0.5, 0.1, 0.5, 0.9, 0.1]
    assert difficulty_ranking(scores).tolist() == [1, 4, 0, 2, 3]
    assert difficulty_ranking(scores, anti=True).tolist() == [3, 0, 2, 1, 4]
    with pytest.raises(ValueError, match="finite"):
        difficulty_ranking([0.1, float("nan")])


def test_curriculum_order_draws_each_batch_from_its_pool() -> None:
    n, batch = 100, 8
    ranked = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    rank_of = torch.empty(n, dtype=torch.long)
    rank_of[ranked] = torch.arange(n)

    def pool(k: int) -> int:
        return min(n, 20 + 10 * k)

    order = curriculum_order(ranked, n, batch, pool, torch.Generator().manual_seed(1))
    assert len(order) == n
    for k in range(math.ceil(n / batch)):
        chunk = order[k * batch : (k + 1) * batch]
        assert int(rank_of[chunk].max()) < pool(k), k
    # same generator seed -> same order; other seed -> other order
    again = curriculum_order(ranked, n, batch, pool, torch.Generator().manual_seed(1))
    other = curriculum_order(ranked, n, batch, pool, torch.Generator().manual_seed(2))
    assert torch.equal(order, again) and not torch.equal(order, other)


def test_curriculum_order_cycles_evenly_through_a_small_pool_and_permutes_a_full_one() -> None:
    ranked = torch.arange(50)
    order = curriculum_order(ranked, 30, 4, lambda k: 10, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == sorted(list(range(10)) * 3)  # each pool sample 3 times, nothing else
    assert sorted(order[:10].tolist()) == list(range(10))  # without replacement until the pool is exhausted
    full = curriculum_order(ranked, 50, 7, lambda k: 50, torch.Generator().manual_seed(0))
    assert sorted(full.tolist()) == list(range(50))


def test_plain_pytorch_curriculum_sampler() -> None:
    scores = _scores(200)
    sampler = CurriculumSampler(scores, full_at_epoch=4, start_fraction=0.25, pacing="linear", seed=3)
    easiest = set(difficulty_ranking(scores)[:50].tolist())
    first = list(sampler)
    assert len(first) == 200 and set(first) == easiest
    sampler.set_epoch(4)
    assert sorted(sampler) == list(range(200))


def test_per_sample_losses_match_cross_entropy() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    got = per_sample_losses(model, LabeledTensorDataset(x, y), batch_size=7)
    want = torch.nn.functional.cross_entropy(model(x), y, reduction="none").double()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ effect on a Trainer
def _rank_of(ranked: torch.Tensor) -> torch.Tensor:
    rank_of = torch.empty(len(ranked), dtype=torch.long)
    rank_of[ranked] = torch.arange(len(ranked))
    return rank_of


def test_easy_samples_first_then_everything() -> None:
    """Step pacing: every early batch comes from the current pool of easiest samples; once the pool is full, a
    whole epoch is a permutation of the training set."""
    L.seed_everything(0)
    batch = 128
    dm = RecordingDigits(batch_size=batch)
    dm.setup()
    n = len(dm.train_dataset)
    scores = _scores(n)
    full_at, steps_per_epoch = 6, math.ceil(n / batch)
    cl = CurriculumLearning(difficulty=scores.tolist(), start_fraction=0.2, full_at=full_at, pacing="linear")
    _trainer(max_steps=2 * steps_per_epoch, callbacks=[cl]).fit(DigitsCNN(channels=4), datamodule=dm)
    seen = torch.tensor(dm.train_dataset.seen)
    rank_of = _rank_of(difficulty_ranking(scores))
    assert int(rank_of[seen[:batch]].max()) < math.ceil(0.2 * n)  # step 0: only the easiest 20 %
    for k in range(full_at):
        pool = math.ceil(pacing_fraction(k, full_at, 0.2, "linear") * n)
        assert int(rank_of[seen[k * batch : (k + 1) * batch]].max()) < pool, k
    # the early steps really are easy: mean difficulty rank of the first steps far below that of a random draw
    assert rank_of[seen[: 2 * batch]].float().mean() < 0.2 * n
    epoch1 = seen[n : 2 * n]  # epoch 0 read exactly n samples
    assert sorted(epoch1.tolist()) == list(range(n))  # by the end: all samples
    assert cl.pool_fraction == 1.0


def test_anti_curriculum_draws_the_hardest_first() -> None:
    L.seed_everything(0)
    dm = RecordingDigits(batch_size=128)
    dm.setup()
    n = len(dm.train_dataset)
    scores = _scores(n)
    cl = CurriculumLearning(difficulty=scores, start_fraction=0.2, full_at=20, anti_curriculum=True)
    _trainer(max_steps=2, callbacks=[cl]).fit(DigitsCNN(channels=4), datamodule=dm)
    hardest = set(torch.argsort(scores, descending=True)[: math.ceil(0.2 * n)].tolist())
    assert set(dm.train_dataset.seen[:128]) <= hardest


def test_epoch_pacing_keeps_the_pool_for_the_whole_epoch() -> None:
    L.seed_everything(0)
    dm = RecordingDigits(batch_size=256)
    dm.setup()
    n = len(dm.train_dataset)
    scores = _scores(n)
    cl = CurriculumLearning(difficulty=scores, pace_by="epoch", full_at=2, start_fraction=0.3, pacing="root")
    steps = math.ceil(n / 256)
    _trainer(max_steps=2 * steps, callbacks=[cl]).fit(DigitsCNN(channels=4), datamodule=dm)
    seen = torch.tensor(dm.train_dataset.seen)
    rank_of = _rank_of(difficulty_ranking(scores))
    pool0 = math.ceil(0.3 * n)
    assert int(rank_of[seen[:n]].max()) < pool0  # the whole of epoch 0 from the easiest 30 %
    pool1 = math.ceil(pacing_fraction(1, 2, 0.3, "root") * n)
    epoch1 = rank_of[seen[n : 2 * n]]
    assert int(epoch1.max()) < pool1 and int(epoch1.max()) >= pool0  # epoch 1: the larger pool, beyond pool 0


def test_difficulty_fn_scores_each_sample() -> None:
    L.seed_everything(0)
    dm = RecordingDigits(batch_size=64)
    cl = CurriculumLearning(difficulty_fn=lambda sample: float(sample[1]), start_fraction=0.05, full_at=50)
    _trainer(max_steps=2, callbacks=[cl]).fit(DigitsCNN(channels=4), datamodule=dm)
    assert torch.equal(cl.scores, dm.train_dataset.targets.double())
    first_batch = dm.train_dataset.seen[len(dm.train_dataset) : len(dm.train_dataset) + 64]  # after the scoring pass
    assert set(dm.train_dataset.targets[first_batch].tolist()) == {0}  # label 0 = easiest 5 %


class _LossProbe(Callback):
    """Per-sample losses of the module at the start of epoch 1 (what self-paced scoring must see)."""

    def __init__(self) -> None:
        self.losses = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.losses = per_sample_losses(pl_module, trainer.datamodule.train_dataset)


def test_self_paced_rescoring_uses_the_current_model() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=256)
    dm.setup()
    cl = CurriculumLearning(difficulty="self_paced", rescore_every_n_epochs=1, start_fraction=0.3, full_at=30)
    probe = _LossProbe()
    steps = math.ceil(len(dm.train_dataset) / 256)
    _trainer(max_steps=steps + 1, callbacks=[cl, probe]).fit(DigitsCNN(channels=4), datamodule=dm)
    assert cl.scored_epoch == 1
    torch.testing.assert_close(cl.scores, probe.losses)


def test_teacher_scoring_restores_the_student(tmp_path: Path) -> None:
    """Scoring with a teacher checkpoint gives the teacher's losses, and training then continues from the student's
    own weights: identical to a run given the teacher's losses as a plain array."""
    dm = DigitsDataModule(batch_size=128)
    dm.setup()
    torch.manual_seed(7)
    teacher = DigitsCNN(channels=4)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict()}, ckpt)
    teacher_losses = per_sample_losses(teacher, dm.train_dataset)

    def run(**kwargs):
        L.seed_everything(0)
        module = DigitsCNN(channels=4)
        cl = CurriculumLearning(start_fraction=0.3, full_at=20, **kwargs)
        _trainer(max_steps=4, callbacks=[cl], deterministic=True).fit(module, datamodule=DigitsDataModule(batch_size=128))
        return module, cl

    a, cl_a = run(difficulty="teacher", teacher_checkpoint=str(ckpt))
    b, _ = run(difficulty=teacher_losses.tolist())
    torch.testing.assert_close(cl_a.scores, teacher_losses)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


# ------------------------------------------------------------------------------------------------ resume
def _digits_n() -> int:
    dm = DigitsDataModule()
    dm.setup()
    return len(dm.train_dataset)


def test_exact_resume_mid_epoch_given_scores(tmp_path: Path) -> None:
    scores = _scores(_digits_n()).tolist()
    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=4),
        lambda: DigitsDataModule(batch_size=64),
        lambda: [CurriculumLearning(difficulty=scores, pacing="geometric", start_fraction=0.1, full_at=10)],
        tmp_path,
        total_steps=8,
        split_step=3,
        trainer_kwargs={"limit_val_batches": 0},
    )
    assert straight["callbacks"][0].batches_done == 8


def test_exact_resume_self_paced_across_a_rescoring(tmp_path: Path) -> None:
    # 5 steps per epoch: the split (6) lies after the epoch-1 rescoring, mid-epoch
    assert_exact_resume(
        lambda: DigitsCNN(channels=4),
        lambda: DigitsDataModule(batch_size=256),
        lambda: [CurriculumLearning(difficulty="self_paced", start_fraction=0.3, full_at=12)],
        tmp_path,
        total_steps=8,
        split_step=6,
        trainer_kwargs={"limit_val_batches": 0},
    )


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one difficulty source"),
        ({"difficulty": [1.0], "difficulty_fn": len}, ValueError, "exactly one difficulty source"),
        ({"difficulty": "loss"}, ValueError, "difficulty='loss'"),
        ({"difficulty": [1.0, float("nan")]}, ValueError, "finite"),
        ({"difficulty": "teacher"}, ValueError, "teacher_checkpoint"),
        ({"difficulty": "self_paced", "teacher_checkpoint": "x.ckpt"}, ValueError, "only used with"),
        ({"difficulty": "self_paced", "pacing": "cubic"}, ValueError, "pacing='cubic'"),
        ({"difficulty": "self_paced", "start_fraction": 0.0}, ValueError, "start_fraction"),
        ({"difficulty": "self_paced", "full_at": 0}, ValueError, "full_at"),
        ({"difficulty": "self_paced", "pace_by": "batch"}, ValueError, "pace_by"),
        ({"difficulty": "self_paced", "rescore_every_n_epochs": 1.5}, TypeError, "rescore_every_n_epochs"),
        ({"difficulty_fn": 3}, TypeError, "difficulty_fn must be callable"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        CurriculumLearning(**kwargs)


class _StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def test_misuse_is_reported_before_the_first_step(tmp_path: Path) -> None:
    counter = _StepCounter()
    with pytest.raises(ValueError, match="difficulty has 3 scores but the training set has"):
        _trainer(max_steps=2, callbacks=[CurriculumLearning(difficulty=[0.1, 0.2, 0.3]), counter]).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule())
    with pytest.raises(FileNotFoundError, match="teacher_checkpoint"):
        _trainer(max_steps=2, callbacks=[CurriculumLearning(difficulty="teacher", teacher_checkpoint=str(
            tmp_path / "missing.ckpt")), counter]).fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
    with pytest.raises(ValueError, match="CurriculumLearning cannot be used together with Oversampling"):
        _trainer(max_steps=2, callbacks=[CurriculumLearning(difficulty="self_paced"), Oversampling(), counter]).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule())
    assert counter.steps == 0


# ------------------------------------------------------------------------------------------------ DDP (whole group)
@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_data_techniques(tmp_path: Path) -> None:
    """One 2-process DDP run over the whole data group (curriculum, self-paced scoring, class weights, oversampling);
    every rank records which indices it read at each step."""
    results = run_ddp_script(DDP_SCRIPT, tmp_path)
    assert_ranks_agree(results, ["cl_weights", "cl_epoch_start", "sp_scores", "sp_weights", "cw_weights", "cw_counts",
                                 "cw_single_counts", "os_weights"])
    r0, r1 = results
    n, batch, full_at = r0["n"], r0["batch"], r0["full_at"]
    ranked = difficulty_ranking(r0["scores"])
    rank_of = torch.empty(n, dtype=torch.long)
    rank_of[ranked] = torch.arange(n)
    seen0, seen1 = r0["cl_seen"], r1["cl_seen"]
    steps = r0["steps_epoch0"]  # full batches of epoch 0 on each rank
    assert steps > full_at
    expected = r0["cl_plan0"]  # the global order of epoch 0, from the core (single process)
    for k in range(steps):
        a, b = seen0[k * batch : (k + 1) * batch], seen1[k * batch : (k + 1) * batch]
        pool = math.ceil(pacing_fraction(k, full_at, r0["start_fraction"], "linear") * n)
        # each rank draws from the current pool of the same curriculum ...
        assert int(rank_of[a].max()) < pool and int(rank_of[b].max()) < pool, k
        # ... a disjoint share of it (positions r, r + 2, ... of the step's global window)
        window = expected[2 * batch * k : 2 * batch * (k + 1)]
        assert torch.equal(a, window[0::2]) and torch.equal(b, window[1::2]), k
        assert not set(a.tolist()) & set(b.tolist()), k
    # class weights: all-reduced counts == counts of the whole training set, counted once
    assert torch.equal(r0["cw_counts"], r0["cw_single_counts"])
    # oversampling: the ranks' draws are the two disjoint position shares of one global weighted draw
    draw = r0["os_plan0"]
    assert torch.equal(r0["os_seen"], draw[0::2][: len(r0["os_seen"])])
    assert torch.equal(r1["os_seen"], draw[1::2][: len(r1["os_seen"])])


def test_class_balanced_ranking_keeps_every_class_in_each_prefix() -> None:
    labels = torch.tensor([0] * 80 + [1] * 20)
    scores = torch.cat([torch.rand(80, generator=torch.Generator().manual_seed(0)),  # class 0: easy
                        1.0 + torch.rand(20, generator=torch.Generator().manual_seed(1))])  # class 1: all harder
    plain = difficulty_ranking(scores)
    assert set(labels[plain[:20]].tolist()) == {0}  # unbalanced: the easy class fills the pool
    balanced = difficulty_ranking(scores, labels=labels)
    assert sorted(balanced.tolist()) == list(range(100))
    prefix = labels[balanced[:20]]
    assert int((prefix == 1).sum()) == 4 and int((prefix == 0).sum()) == 16  # 20 % of each class
    # within a class, the easiest come first
    zeros = balanced[labels[balanced] == 0]
    assert torch.equal(zeros, plain[labels[plain] == 0])
