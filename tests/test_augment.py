"""Input noise, kornia image augmentation, MixUp and CutMix: cores vs formula / kornia, training-only effect on a
stock Trainer (evaluation untouched), soft-target criterion handling, exact resume, bad input.
(The group's DDP test is in test_normalization.py.)"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import CutMix, ImageAugmentation, InputNoise, MixUp, SoftTargetNLLLoss
from lightning_techniques.augment._seeding import derive_seed
from lightning_techniques.augment.mixing import cutmix_box
from lightning_techniques.demo import BreastCancerDataModule, DigitsCNN, DigitsDataModule, TabularMLP
from lightning_techniques.functional import (
    add_noise,
    augment_images,
    build_augmentation,
    cutmix,
    mixup,
    scheduled_scale,
    soft_targets,
)
from lightning_techniques.testing import assert_exact_resume


class RecordingDigits(DigitsDataModule):
    """Digits whose own ``on_after_batch_transfer`` records the raw batch (it runs before every batch transform)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.raw: dict[str, list] = {"train": [], "val": []}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        stage = "train" if self.trainer.training else "val"
        self.raw[stage].append((batch[0].clone(), batch[1].clone()))
        return batch


class Seen(Callback):
    """What ``training_step`` / ``validation_step`` receive."""

    def __init__(self) -> None:
        self.train: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append((batch[0].clone(), batch[1].clone()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append((batch[0].clone(), batch[1].clone()))


def _run(callbacks, trainer_kwargs, max_steps=3, module=None, datamodule=None, **kw):
    L.seed_everything(0, verbose=False)
    seen = Seen()
    dm = datamodule or RecordingDigits(batch_size=64)
    module = module or DigitsCNN(channels=4)
    trainer = L.Trainer(callbacks=[*callbacks, seen], max_steps=max_steps,
                        **{**trainer_kwargs, "limit_val_batches": 1, "val_check_interval": max_steps, **kw})
    trainer.fit(module, datamodule=dm)
    return trainer, dm, seen


def _assert_eval_untouched(dm: RecordingDigits, seen: Seen) -> None:
    assert seen.val, "no validation batch ran"
    for (raw_x, raw_y), (x, y) in zip(dm.raw["val"], seen.val):
        assert torch.equal(raw_x, x) and torch.equal(raw_y, y)


# ============================================================================================================ noise


def test_noise_kinds_match_their_formula() -> None:
    x = torch.zeros(200, 100)
    g = torch.Generator().manual_seed(3)
    out = add_noise(x, 0.5, "gaussian", torch.Generator().manual_seed(3))
    assert torch.equal(out, x + 0.5 * torch.randn(x.shape, generator=g))
    assert abs(float(out.std()) - 0.5) < 0.01 and abs(float(out.mean())) < 0.01
    out = add_noise(x, 0.2, "uniform", torch.Generator().manual_seed(0))
    assert float(out.abs().max()) <= 0.2 and abs(float(out.var()) - 0.2**2 / 3) < 1e-3
    x = torch.full((200, 100), 0.5)
    out = add_noise(x, 0.1, "salt_and_pepper", torch.Generator().manual_seed(0), salt_value=1.0, pepper_value=0.0)
    corrupted = out != 0.5
    assert abs(float(corrupted.float().mean()) - 0.1) < 0.01
    assert set(out[corrupted].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(add_noise(x, 0.0), x)


def test_schedules_match_their_formula() -> None:
    assert scheduled_scale(7, 10, 0.3, 0.0, "constant") == 0.3
    assert scheduled_scale(5, 10, 1.0, 0.0, "linear") == pytest.approx(0.5)
    assert scheduled_scale(0, 10, 1.0, 0.2, "cosine") == pytest.approx(1.0)
    assert scheduled_scale(5, 10, 1.0, 0.2, "cosine") == pytest.approx(0.6)
    assert scheduled_scale(10, 10, 1.0, 0.2, "cosine") == pytest.approx(0.2)
    assert scheduled_scale(5, 10, 1.0, 0.01, "exponential") == pytest.approx(0.1)
    assert scheduled_scale(50, 10, 1.0, 0.2, "linear") == pytest.approx(0.2)  # held at the end


def test_noise_follows_the_schedule_in_training_only(trainer_kwargs) -> None:
    noise = InputNoise(kind="gaussian", scale=0.5, final_scale=0.1, schedule="linear", schedule_steps=4)
    trainer, dm, seen = _run([noise], trainer_kwargs, max_steps=5)
    assert len(seen.train) == 5
    for step, ((raw_x, raw_y), (x, y)) in enumerate(zip(dm.raw["train"], seen.train)):
        drawn = x - raw_x
        expected = scheduled_scale(step, 4, 0.5, 0.1, "linear")
        assert abs(float(drawn.std()) - expected) < 0.05 * expected, (step, float(drawn.std()), expected)
        assert torch.equal(raw_y, y)
    assert trainer.callback_metrics["input_noise/scale"] == pytest.approx(0.1)
    _assert_eval_untouched(dm, seen)
    assert "on_after_batch_transfer" not in {k for k in vars(dm) if k != "raw"}  # unwrapped at teardown


def test_noise_reproducible_and_differs_per_rank_and_step() -> None:
    assert derive_seed(0, 1, 2, 0, 0) == derive_seed(0, 1, 2, 0, 0)
    seeds = {derive_seed(0, 1, step, 0, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200


def test_salt_and_pepper_with_clip_on_images(trainer_kwargs) -> None:
    noise = InputNoise(kind="salt_and_pepper", scale=0.25, clip=[0.0, 1.0])
    _, dm, seen = _run([noise], trainer_kwargs, max_steps=1, limit_val_batches=0)
    (raw_x, _), (x, _) = dm.raw["train"][0], seen.train[0]
    changed = x != raw_x
    assert 0.15 < float(changed.float().mean()) < 0.3
    assert set(x[changed].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kind": "pink"}, ValueError, "kind="),
        ({"scale": -0.1}, ValueError, "scale"),
        ({"kind": "salt_and_pepper", "scale": 2.0}, ValueError, "corruption probability"),
        ({"schedule": "exponential", "final_scale": 0.0}, ValueError, "exponential"),
        ({"clip": [1.0, 0.0]}, ValueError, "clip"),
        ({"schedule_steps": 0}, ValueError, "schedule_steps"),
        ({"scale": "big"}, TypeError, "scale"),
    ],
)
def test_noise_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        InputNoise(**kwargs)


# ===================================================================================================== augmentation


def test_augment_images_is_kornia_seeded_and_leaves_global_rng_alone() -> None:
    x = torch.rand(8, 1, 8, 8)
    aug = build_augmentation(hflip_p=0.5, rotation_degrees=20, rotation_p=0.5, brightness=0.3, color_p=0.5)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    out = augment_images(aug, x, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    torch.manual_seed(7)
    assert torch.equal(out, aug(x))  # exactly kornia's own result under that seed
    assert torch.equal(out, augment_images(aug, x, seed=7)) and not torch.equal(out, augment_images(aug, x, seed=8))
    flip = augment_images(build_augmentation(hflip_p=1.0), x, seed=0)
    assert torch.equal(flip, x.flip(-1))


def test_augmentation_in_training_only(trainer_kwargs) -> None:
    aug = ImageAugmentation(hflip_p=1.0, vflip_p=1.0)
    _, dm, seen = _run([aug], trainer_kwargs, max_steps=2)
    for (raw_x, raw_y), (x, y) in zip(dm.raw["train"], seen.train):
        assert torch.equal(x, raw_x.flip(-1).flip(-2)) and torch.equal(y, raw_y)
    _assert_eval_untouched(dm, seen)


def test_augmentation_probability_per_technique(trainer_kwargs) -> None:
    aug = ImageAugmentation(hflip_p=0.5)
    _, dm, seen = _run([aug], trainer_kwargs, max_steps=2, limit_val_batches=0)
    raw_x, x = torch.cat([r[0] for r in dm.raw["train"]]), torch.cat([s[0] for s in seen.train])
    flipped = (x == raw_x.flip(-1)).flatten(1).all(1) & ~(x == raw_x).flatten(1).all(1)
    kept = (x == raw_x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 0.3 < float(flipped.float().mean()) < 0.7


def test_augmentation_bad_input(trainer_kwargs) -> None:
    with pytest.raises(ValueError, match="hflip_p"):
        ImageAugmentation(hflip_p=1.5)
    with pytest.raises(ValueError, match="every technique is disabled"):
        ImageAugmentation(hflip_p=0.0)
    with pytest.raises(ValueError, match="hue"):
        ImageAugmentation(hue=0.7)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        _run([ImageAugmentation()], trainer_kwargs, max_steps=1, module=TabularMLP(),
             datamodule=BreastCancerDataModule())


# ======================================================================================================== MixUp/CutMix


def test_mixup_and_cutmix_formulas() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    y = soft_targets(torch.tensor([0, 2]), 3)
    assert y.tolist() == [[1, 0, 0], [0, 0, 1]]
    perm = torch.tensor([1, 0])
    mx, my = mixup(x, y, 0.7, perm)
    torch.testing.assert_close(mx[0], 0.7 * x[0] + 0.3 * x[1])
    torch.testing.assert_close(my[0], torch.tensor([0.7, 0.0, 0.3]))
    cx, cy, lam = cutmix(x, y, (1, 3, 0, 2), perm)
    assert lam == pytest.approx(1 - 4 / 16)
    assert torch.equal(cx[0, :, 1:3, 0:2], x[1, :, 1:3, 0:2])
    assert torch.equal(cx[0, :, 0, :], x[0, :, 0, :])
    torch.testing.assert_close(cy[0], torch.tensor([0.75, 0.0, 0.25]))
    top, bottom, left, right = cutmix_box(32, 32, 0.75, np.random.default_rng(0))
    assert (bottom - top) <= 16 and (right - left) <= 16  # sqrt(1 - 0.75) * 32 = 16, clipped at the border


def test_soft_target_nll_matches_torch() -> None:
    logits = torch.randn(5, 4)
    logp = logits.log_softmax(1)
    y = torch.tensor([0, 3, 1, 1, 2])
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5])
    torch.testing.assert_close(SoftTargetNLLLoss()(logp, F.one_hot(y, 4).float()), F.nll_loss(logp, y))
    soft = torch.softmax(torch.randn(5, 4), 1)
    torch.testing.assert_close(SoftTargetNLLLoss(weight)(logp, soft), F.cross_entropy(logits, soft, weight=weight))


def _recover_pairs(raw_x: torch.Tensor, x: torch.Tensor, lam: float) -> torch.Tensor:
    other = (x - lam * raw_x) / (1 - lam)  # = raw_x[perm]
    distances = torch.cdist(other.flatten(1), raw_x.flatten(1))
    return distances.argmin(1)


def test_mixup_mixes_inputs_and_targets_in_training_only(trainer_kwargs) -> None:
    mix = MixUp(alpha=0.4)
    _, dm, seen = _run([mix], trainer_kwargs, max_steps=1)
    (raw_x, raw_y), (x, y) = dm.raw["train"][0], seen.train[0]
    lam = mix.last_lam
    assert 0 < lam < 1 and y.shape == (64, 10) and y.dtype == torch.float32
    perm = _recover_pairs(raw_x, x, lam)
    assert sorted(perm.tolist()) == list(range(64))  # a permutation of the batch
    torch.testing.assert_close(x, lam * raw_x + (1 - lam) * raw_x[perm])
    onehot = F.one_hot(raw_y, 10).float()
    torch.testing.assert_close(y, lam * onehot + (1 - lam) * onehot[perm])
    _assert_eval_untouched(dm, seen)


def test_cutmix_pastes_a_box_and_mixes_by_area(trainer_kwargs) -> None:
    mix = CutMix(alpha=1.0)
    _, dm, seen = _run([mix], trainer_kwargs, max_steps=1)
    (raw_x, raw_y), (x, y) = dm.raw["train"][0], seen.train[0]
    lam = mix.last_lam
    area = round((1 - lam) * 64)
    assert 0 < area < 64 and (1 - lam) * 64 == pytest.approx(area)  # lam is the pasted box's exact pixel fraction
    changed = (x != raw_x).any(0).any(0)  # [H, W]: pixels pasted in at least one image (all inside one box)
    rows, cols = changed.nonzero(as_tuple=True)
    assert int((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)) <= area
    torch.testing.assert_close(y.sum(1), torch.ones(64))
    own = y[torch.arange(64), raw_y]  # lam, or 1 when the partner has the same label
    assert all(v == pytest.approx(lam) or v == pytest.approx(1.0) for v in own.tolist())
    assert any(v == pytest.approx(lam) for v in own.tolist())
    _assert_eval_untouched(dm, seen)


def test_nll_criterion_is_replaced_for_the_run_and_restored(trainer_kwargs) -> None:
    class LogSoftmaxCNN(DigitsCNN):
        def __init__(self) -> None:
            super().__init__(channels=4)
            self.criterion = nn.NLLLoss()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).log_softmax(1)

    module = LogSoftmaxCNN()
    original = module.criterion
    seen_criteria = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen_criteria.append(type(pl_module.criterion).__name__)

    trainer, _, _ = _run([MixUp(), Probe()], trainer_kwargs, max_steps=2, module=module, limit_val_batches=0)
    assert seen_criteria == ["SoftTargetNLLLoss", "SoftTargetNLLLoss"]
    assert module.criterion is original  # restored at teardown
    assert math.isfinite(float(trainer.callback_metrics["train_loss"]))


def test_exact_resume_noise_augmentation_mixup(tmp_path) -> None:
    """The realistic stack in one run, with gradient accumulation: every draw depends on (seed, global_step,
    micro-batch, rank) only, so the resumed run draws exactly what the straight run drew. schedule_steps is
    explicit: by default the schedule spans the *current* run, and the harness's first half is a shorter run
    (max_steps=2) than the straight one."""

    def callbacks():
        return [InputNoise(scale=0.3, final_scale=0.05, schedule="cosine", schedule_steps=4),
                ImageAugmentation(rotation_degrees=15, brightness=0.2, contrast=0.2), MixUp(alpha=0.4)]

    assert_exact_resume(lambda: DigitsCNN(channels=4), lambda: DigitsDataModule(batch_size=32), callbacks, tmp_path,
                        total_steps=4, trainer_kwargs={"accumulate_grad_batches": 2})


def test_exact_resume_cutmix(tmp_path) -> None:
    assert_exact_resume(lambda: DigitsCNN(channels=4), lambda: DigitsDataModule(batch_size=32), lambda: [CutMix()],
                        tmp_path, total_steps=4)


def test_mixing_bad_input(trainer_kwargs) -> None:
    with pytest.raises(ValueError, match="alpha"):
        MixUp(alpha=0.0)
    with pytest.raises(ValueError, match="p must"):
        CutMix(p=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        MixUp(num_classes=1)

    class MSEModule(DigitsCNN):
        def __init__(self) -> None:
            super().__init__(channels=4)
            self.criterion = nn.MSELoss()

    with pytest.raises(ValueError, match="MSELoss, which cannot take soft targets"):
        _run([MixUp()], trainer_kwargs, max_steps=1, module=MSEModule())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        _run([CutMix()], trainer_kwargs, max_steps=1, module=TabularMLP(), datamodule=BreastCancerDataModule())
