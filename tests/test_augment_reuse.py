"""An augmentation callback instance reused after a failed run transforms the next run's batches again (the shared
clean-up removed its batch transform when the first run failed; the callback must notice and install it anew)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import CutMix, ImageAugmentation, InputNoise, MixUp
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.mechanisms import BatchTransformCallback
from lightning_techniques.testing import SimulatedKill, kill_at_step


class _Seen(Callback):
    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        raw = trainer.datamodule.train_dataset.inputs  # the demo's tensors: is the batch one of them, unchanged?
        self.pairs.append((batch[0].detach().clone(), raw))


def _changed(seen: _Seen) -> bool:
    x, raw = seen.pairs[0]
    flat = raw.flatten(1)
    # every sample of an untransformed batch is one of the dataset's rows
    return not all(bool((flat == row).all(dim=1).any()) for row in x.flatten(1))


@pytest.mark.parametrize("make", [lambda: InputNoise(scale=0.5, seed=0), lambda: ImageAugmentation(rotation_p=1.0,
                                  rotation_degrees=30.0, hflip_p=1.0, seed=0), lambda: MixUp(alpha=1.0, seed=0),
                                  lambda: CutMix(alpha=1.0, seed=0)], ids=["InputNoise", "ImageAugmentation", "MixUp",
                                                                          "CutMix"])
def test_reused_after_a_failed_run_it_transforms_again(make: Any) -> None:
    technique = make()
    assert isinstance(technique, BatchTransformCallback)  # the mechanism's base owns install/reinstall/removal
    quiet = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    L.seed_everything(0, verbose=False)
    with pytest.raises(SimulatedKill):
        L.Trainer(max_steps=3, callbacks=[technique, kill_at_step(1)], **quiet).fit(
            DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))
    seen = _Seen()
    L.Trainer(max_steps=1, callbacks=[technique, seen], **quiet).fit(
        DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=16))
    assert _changed(seen), f"{type(technique).__name__} did not transform the batches of the second run"
