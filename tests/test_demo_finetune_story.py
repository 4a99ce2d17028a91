"""The two-stage digits task of the fine-tuning story: ``DigitsDataModule(classes=...)`` keeps the listed digits and
remaps their labels; the default (all ten digits) is unchanged."""

from __future__ import annotations

import pytest
import torch

from lightning_techniques.demo import DigitsDataModule


def _all(dm: DigitsDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    dm.setup("fit")
    parts = [dm.train_dataset, dm.val_dataset, dm.test_dataset]
    return torch.cat([p.inputs for p in parts]), torch.cat([p.targets for p in parts])  # type: ignore[union-attr]


def test_classes_keep_the_digits_and_remap_labels_in_the_given_order() -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    full_x, full_y = _all(DigitsDataModule())
    assert DigitsDataModule().num_classes == 10 and len(full_y) == len(data.target)
    assert sorted(full_y.unique().tolist()) == list(range(10))

    second = DigitsDataModule(classes=[5, 6, 7, 8, 9])
    x, y = _all(second)
    assert second.num_classes == 5 and DigitsDataModule.num_classes == 10  # the class attribute is untouched
    assert len(y) == int(sum(t >= 5 for t in data.target))
    assert sorted(y.unique().tolist()) == [0, 1, 2, 3, 4]
    # each image keeps its digit: label k of the stage-2 set is digit 5 + k in the full set
    images = {bytes(img.numpy().tobytes()): int(lbl) for img, lbl in zip(full_x, full_y)}
    assert all(images[bytes(img.numpy().tobytes())] == 5 + int(lbl) for img, lbl in zip(x[:200], y[:200]))

    reordered = DigitsDataModule(classes=[9, 3])
    x, y = _all(reordered)
    assert all(images[bytes(img.numpy().tobytes())] == (9 if lbl == 0 else 3) for img, lbl in zip(x, y))


def test_classes_with_keep_fraction_take_digits_as_keys() -> None:
    dm = DigitsDataModule(classes=[5, 6, 7, 8, 9], keep_fraction={7: 0.1})
    dm.setup("fit")
    counts = torch.bincount(dm.train_dataset.targets, minlength=5).tolist()  # type: ignore[union-attr]
    assert counts[2] < counts[0] / 5 and min(counts[:2] + counts[3:]) > 50


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": [3]}, "at least two"),
        ({"classes": [1, 1]}, "distinct"),
        ({"classes": [0, 10]}, "classes"),
        ({"classes": "01234"}, "list of at least two"),
        ({"classes": [0, 1], "keep_fraction": {5: 0.5}}, "not among classes"),
    ],
)
def test_bad_classes_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)
