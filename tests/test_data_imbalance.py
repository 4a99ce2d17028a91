"""Class imbalance: class weights, focal loss, label finding, weighted loss and oversampling on a stock Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_techniques import ClassWeightedLoss, FocalLoss, Oversampling
from lightning_techniques.data.imbalance import class_weights, sample_weights, weighted_draw
from lightning_techniques.data.labels import class_counts, find_labels
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.demo.data import LabeledTensorDataset
from lightning_techniques.demo.models import ClassifierModule
from lightning_techniques.testing import assert_exact_resume

IMBALANCED = {0: 0.05, 1: 0.05, 2: 0.2}


def _trainer(**kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


# ------------------------------------------------------------------------------------------------ class weights
def test_class_weights_formulas() -> None:
    counts = torch.tensor([100.0, 25.0, 4.0])
    inv = class_weights(counts, "inverse", normalize=False)
    torch.testing.assert_close(inv, torch.tensor([0.01, 0.04, 0.25], dtype=torch.float64))
    sq = class_weights(counts, "inverse_sqrt", normalize=False)
    torch.testing.assert_close(sq, torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64))
    beta = 0.9
    eff = class_weights(counts, "effective", beta=beta, normalize=False)
    want = torch.tensor([(1 - beta) / (1 - beta**n) for n in (100, 25, 4)], dtype=torch.float64)
    torch.testing.assert_close(eff, want)
    # normalised: present classes sum to their number; absent classes get 0; balanced data -> ones
    w = class_weights(torch.tensor([10.0, 0.0, 30.0]), "inverse")
    assert w[1] == 0 and float(w.sum()) == pytest.approx(2.0)
    torch.testing.assert_close(w[0] / w[2], torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(class_weights([7, 7, 7], "effective"), torch.ones(3, dtype=torch.float64))
    # beta -> 0: no re-weighting; beta -> 1: inverse frequency
    torch.testing.assert_close(class_weights(counts, "effective", beta=0.0), torch.ones(3, dtype=torch.float64))
    near = class_weights(counts, "effective", beta=1 - 1e-9)
    torch.testing.assert_close(near, class_weights(counts, "inverse"), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="mode="):
        class_weights(counts, "log")
    with pytest.raises(ValueError, match="beta"):
        class_weights(counts, "effective", beta=1.0)


def test_sample_weights_and_seeded_draw() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    w = sample_weights(labels, class_weights(class_counts(labels), "inverse"))
    torch.testing.assert_close(w, torch.tensor([0.5, 0.5, 0.5, 1.5], dtype=torch.float64))
    a = weighted_draw(w, 1000, True, torch.Generator().manual_seed(0))
    b = weighted_draw(w, 1000, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert 0.4 < float((a == 3).float().mean()) < 0.6  # class 1 (one sample) drawn half the time
    no_rep = weighted_draw(w, 4, False, torch.Generator().manual_seed(0))
    assert sorted(no_rep.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="without replacement"):
        weighted_draw(w, 5, False, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ focal loss
def test_focal_loss_gamma0_is_weighted_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(16, 4), torch.randint(0, 4, (16,))
    target[3] = -100
    weight = torch.tensor([1.0, 2.0, 0.5, 3.0])
    for reduction in ("mean", "sum", "none"):
        got = FocalLoss(gamma=0.0, weight=weight, reduction=reduction)(logits, target)
        want = F.cross_entropy(logits, target, weight=weight, reduction=reduction)
        torch.testing.assert_close(got, want)


def test_focal_loss_matches_its_formula() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([0, 0])
    p = logits.softmax(1)[torch.arange(2), target]
    want = (-((1 - p) ** 2) * p.log()).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0)(logits, target), want)
    # easy samples are down-weighted relative to cross-entropy
    ce = F.cross_entropy(logits, target, reduction="none")
    fl = FocalLoss(gamma=2.0, reduction="none")(logits, target)
    assert (fl / ce)[0] < (fl / ce)[1]
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)


# ------------------------------------------------------------------------------------------------ labels
class _NoTouch(Dataset):
    """Labels as an attribute; reading an item fails (proves the inputs are never read)."""

    def __init__(self) -> None:
        self.targets = [0, 2, 2, 1]

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise AssertionError("an item was read")


class _Items(Dataset):
    def __init__(self, as_dict: bool = False) -> None:
        self.reads = 0
        self.as_dict = as_dict

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int):
        self.reads += 1
        x, y = torch.zeros(3), torch.tensor(i % 3)
        return {"x": x, "label": y} if self.as_dict else (x, y)


class _Unlabeled(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        return torch.zeros(3)


def test_find_labels_without_reading_items_when_possible() -> None:
    assert find_labels(_NoTouch()).tolist() == [0, 2, 2, 1]
    assert find_labels(Subset(_NoTouch(), [3, 1])).tolist() == [1, 2]
    assert find_labels(ConcatDataset([_NoTouch(), _NoTouch()])).tolist() == [0, 2, 2, 1] * 2
    assert find_labels(TensorDataset(torch.zeros(3, 2), torch.tensor([1, 0, 1]))).tolist() == [1, 0, 1]
    items = _Items()
    assert find_labels(items).tolist() == [0, 1, 2, 0, 1] and items.reads == 5  # one pass
    assert find_labels(_Items(as_dict=True)).tolist() == [0, 1, 2, 0, 1]
    share = _Items()
    assert find_labels(share, indices=range(1, 5, 2)).tolist() == [1, 0] and share.reads == 2  # a rank's share only
    assert find_labels(_NoTouch(), indices=range(0, 4, 2)).tolist() == [0, 2]
    with pytest.raises(TypeError, match="Cannot find class labels in _Unlabeled"):
        find_labels(_Unlabeled())
    with pytest.raises(ValueError, match="non-integer"):
        find_labels(LabeledTensorDataset(torch.zeros(2, 1), torch.tensor([0.5, 1.0])))
    with pytest.raises(ValueError, match="1-D"):
        find_labels(LabeledTensorDataset(torch.zeros(2, 1), torch.zeros(2, 3)))


# ------------------------------------------------------------------------------------------------ weighted loss
class _LossProbe(Callback):
    """Before each step, the weighted cross-entropy the module should compute; after it, what it returned."""

    def __init__(self) -> None:
        self.expected: list[torch.Tensor] = []
        self.got: list[torch.Tensor] = []
        self.weights: list[torch.Tensor | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        with torch.no_grad():
            weight = pl_module.criterion.weight
            self.expected.append(F.cross_entropy(pl_module(x), y, weight=weight))
        self.weights.append(weight)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.got.append(outputs["loss"].detach())


def test_weighted_loss_applies_all_reduced_weights_and_restores() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, keep_fraction=IMBALANCED)
    module = DigitsCNN(channels=4)
    keys = set(module.state_dict())
    cw = ClassWeightedLoss(mode="inverse")
    probe = _LossProbe()
    _trainer(max_steps=3, callbacks=[cw, probe]).fit(module, datamodule=dm)
    counts = class_counts(dm.train_dataset.targets)
    torch.testing.assert_close(cw.counts, counts)
    want = class_weights(counts, "inverse")
    torch.testing.assert_close(cw.class_weights, want)
    assert want[0] > 10 * want[5]  # the 5 % classes weigh much more
    assert len(probe.weights) == 3 and all(torch.equal(w, want.float()) for w in probe.weights)
    for expected, got in zip(probe.expected, probe.got):
        torch.testing.assert_close(got, expected)  # the module's own training_step computed the weighted loss
    unweighted = F.cross_entropy(module(dm.train_dataset.inputs[:256]), dm.train_dataset.targets[:256])
    assert module.criterion.weight is None  # restored after fit
    assert torch.isfinite(unweighted)
    assert set(module.state_dict()) == keys  # nothing added to the checkpointed state


def test_focal_option_replaces_the_criterion_for_the_run() -> None:
    L.seed_everything(0)
    module = DigitsCNN(channels=4)
    original = module.criterion
    seen: list[nn.Module] = []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen.append(pl_module.criterion)

    cw = ClassWeightedLoss(mode="inverse_sqrt", focal_gamma=2.0)
    _trainer(max_steps=2, callbacks=[cw, Spy()]).fit(module, datamodule=DigitsDataModule(batch_size=128,
                                                                                       keep_fraction=IMBALANCED))
    assert isinstance(seen[0], FocalLoss) and seen[0].gamma == 2.0
    torch.testing.assert_close(seen[0].weight, cw.class_weights.float())
    assert module.criterion is original


class _NoCriterion(ClassifierModule):
    """A module computing its loss with F.cross_entropy and self.class_weights (no criterion attribute)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        del self.criterion
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.used: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.used.append(self.class_weights.clone())
        return F.cross_entropy(self(x), y, weight=self.class_weights)


def test_a_module_without_criterion_is_refused_in_setup() -> None:
    # F.cross_entropy in training_step: the weights could not reach the loss - silently doing nothing is refused
    module = _NoCriterion()
    trainer = _trainer(max_steps=2, callbacks=[ClassWeightedLoss()])
    with pytest.raises(ValueError, match=r"cannot reach the loss of _NoCriterion.*self\.criterion = nn\.CrossEntropyLoss"
                                         r"\(\).*expose_only=True"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=128, keep_fraction=IMBALANCED))
    assert trainer.global_step == 0 and not module.used and not hasattr(module, "class_weights")


def test_expose_only_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="expose_only=True .* cannot be combined"):
        ClassWeightedLoss(expose_only=True, focal_gamma=2.0)
    with pytest.raises(TypeError, match="expose_only must be a bool"):
        ClassWeightedLoss(expose_only="yes")  # type: ignore[arg-type]


def test_weights_are_exposed_when_the_module_opts_in() -> None:
    L.seed_everything(0)
    module = _NoCriterion()
    cw = ClassWeightedLoss(mode="effective", beta=0.99, expose_only=True)
    _trainer(max_steps=2, callbacks=[cw]).fit(module, datamodule=DigitsDataModule(batch_size=128,
                                                                                keep_fraction=IMBALANCED))
    torch.testing.assert_close(module.used[0], cw.class_weights.float())
    assert not hasattr(module, "class_weights")  # removed at teardown


def test_weighted_loss_exact_resume(tmp_path: Path) -> None:
    assert_exact_resume(
        lambda: DigitsCNN(channels=4),
        lambda: DigitsDataModule(batch_size=128, keep_fraction=IMBALANCED),
        lambda: [ClassWeightedLoss(mode="effective", beta=0.999, focal_gamma=1.0)],
        tmp_path,
        total_steps=6,
        trainer_kwargs={"limit_val_batches": 0},
    )


# ------------------------------------------------------------------------------------------------ oversampling
class _LabelProbe(Callback):
    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch[1].clone())


def test_oversampling_rebalances_the_classes() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=128, keep_fraction=IMBALANCED)
    dm.setup()
    base_rate = float((dm.train_dataset.targets == 0).float().mean())
    probe = _LabelProbe()
    _trainer(max_epochs=1, callbacks=[Oversampling(mode="inverse"), probe]).fit(DigitsCNN(channels=4), datamodule=dm)
    drawn = torch.cat(probe.labels)
    assert len(drawn) == len(dm.train_dataset)
    share = torch.bincount(drawn, minlength=10).double() / len(drawn)
    assert base_rate < 0.01
    assert float(share.min()) > 0.06 and float(share.max()) < 0.14  # ~10 % each instead of < 1 %


def test_oversampling_user_weights_and_without_replacement() -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    y = dm.train_dataset.targets
    only_threes = (y == 3).double().tolist()
    probe = _LabelProbe()
    _trainer(max_steps=3, callbacks=[Oversampling(sample_weights=only_threes), probe]).fit(
        DigitsCNN(channels=4), datamodule=dm)
    assert set(torch.cat(probe.labels).tolist()) == {3}
    # without replacement and fewer draws than samples: each sample at most once, minority favoured
    dm = DigitsDataModule(batch_size=64, keep_fraction=IMBALANCED)
    dm.setup()
    probe = _LabelProbe()
    cb = Oversampling(mode="inverse", replacement=False, num_samples=256)
    _trainer(max_epochs=1, callbacks=[cb, probe]).fit(DigitsCNN(channels=4), datamodule=dm)
    drawn = torch.cat(probe.labels)
    assert len(drawn) == 256
    n0 = int((dm.train_dataset.targets == 0).sum())
    assert int((drawn == 0).sum()) <= n0
    assert float((drawn == 0).float().mean()) > 3 * float((dm.train_dataset.targets == 0).float().mean())


def test_oversampling_is_reproducible_by_seed() -> None:
    def draw(seed: int) -> torch.Tensor:
        L.seed_everything(123)  # the draw must not depend on the global seed
        probe = _LabelProbe()
        _trainer(max_steps=3, callbacks=[Oversampling(seed=seed), probe]).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=64, keep_fraction=IMBALANCED))
        return torch.cat(probe.labels)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_oversampling_exact_resume_mid_epoch(tmp_path: Path) -> None:
    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=4),
        lambda: DigitsDataModule(batch_size=64, keep_fraction=IMBALANCED),
        lambda: [Oversampling(mode="effective", beta=0.99, seed=4)],
        tmp_path,
        total_steps=8,
        split_step=5,
        trainer_kwargs={"limit_val_batches": 0},
    )
    assert straight["callbacks"][0].state_dict()["sampler"]["batches"] == 8


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (lambda: ClassWeightedLoss(mode="balanced"), ValueError, "mode='balanced'"),
        (lambda: ClassWeightedLoss(beta=1.0), ValueError, "beta"),
        (lambda: ClassWeightedLoss(focal_gamma=-2.0), ValueError, "focal_gamma"),
        (lambda: ClassWeightedLoss(num_classes=1), ValueError, "num_classes"),
        (lambda: ClassWeightedLoss(expose_attr="not valid"), ValueError, "expose_attr"),
        (lambda: Oversampling(mode="x"), ValueError, "mode='x'"),
        (lambda: Oversampling(sample_weights=[1.0, -1.0]), ValueError, "sample_weights"),
        (lambda: Oversampling(sample_weights=[0.0, 0.0]), ValueError, "sample_weights"),
        (lambda: Oversampling(num_samples=0), ValueError, "num_samples"),
        (lambda: Oversampling(replacement="yes"), TypeError, "replacement"),
    ],
)
def test_bad_arguments(factory, error, match) -> None:
    with pytest.raises(error, match=match):
        factory()


class _BCEModule(DigitsCNN):
    def __init__(self) -> None:
        super().__init__(channels=4)
        self.criterion = nn.MSELoss()


def test_misuse_is_reported_before_the_first_step() -> None:
    steps = []

    class Counter(Callback):
        def on_train_batch_start(self, *args) -> None:
            steps.append(1)

    dm = DigitsDataModule(batch_size=128)
    with pytest.raises(TypeError, match="has no `weight` option"):
        _trainer(max_steps=1, callbacks=[ClassWeightedLoss(), Counter()]).fit(_BCEModule(), datamodule=dm)
    with pytest.raises(TypeError, match="replaces an nn.CrossEntropyLoss"):
        _trainer(max_steps=1, callbacks=[ClassWeightedLoss(focal_gamma=2.0), Counter()]).fit(_BCEModule(),
                                                                                          datamodule=dm)
    with pytest.raises(AttributeError, match="criterion_attr='loss_fn'"):
        _trainer(max_steps=1, callbacks=[ClassWeightedLoss(criterion_attr="loss_fn"), Counter()]).fit(
            DigitsCNN(channels=4), datamodule=dm)
    with pytest.raises(ValueError, match="sample_weights has 3 entries"):
        _trainer(max_steps=1, callbacks=[Oversampling(sample_weights=[1.0, 1.0, 1.0]), Counter()]).fit(
            DigitsCNN(channels=4), datamodule=dm)
    with pytest.raises(ValueError, match="without replacement exceeds"):
        _trainer(max_steps=1, callbacks=[Oversampling(replacement=False, num_samples=5000), Counter()]).fit(
            DigitsCNN(channels=4), datamodule=dm)
    assert not steps


def test_criterion_is_restored_when_the_run_fails() -> None:
    class Boom(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            assert pl_module.criterion.weight is not None  # weights in use during the run
            raise RuntimeError("boom")

    module = DigitsCNN(channels=4)
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(max_steps=2, callbacks=[ClassWeightedLoss(), Boom()]).fit(module, datamodule=DigitsDataModule())
    assert module.criterion.weight is None
