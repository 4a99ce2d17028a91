"""Cells of notebooks/01_data_techniques.ipynb, part 2 (normalisation, augmentation, MixUp/CutMix, input noise);
``notebooks/_build_01_data_techniques.py`` builds the notebook from part 1 and these."""

from __future__ import annotations

cells: list[tuple[str, str]] = [
    ("md", """# Part 2: normalisation, augmentation, MixUp/CutMix and input noise

Every technique here is a Lightning `Callback` that transforms the batch **on the device**, after the transfer and
before `training_step`, with the user's module left unmodified:

* `ZScoreNormalization` / `MinMaxNormalization` fit their statistics on the training split once (float64, streaming,
  all-reduced under DDP), apply them in training **and** evaluation, keep them in the checkpoint and export them as a
  plain `nn.Module`;
* `InputNoise`, `ImageAugmentation` (kornia), `MixUp` and `CutMix` act in training only."""),
    ("code", """import logging, tempfile, warnings
import lightning as L
import matplotlib.pyplot as plt
import torch
from torch import nn

from lightning_techniques import (CutMix, ImageAugmentation, InputNoise, MinMaxNormalization, MixUp,
                                  ZScoreNormalization, augment_images, build_augmentation, cutmix, mixup,
                                  scheduled_scale, soft_targets)
from lightning_techniques.augment.mixing import cutmix_box
from lightning_techniques.demo import BreastCancerDataModule, DigitsCNN, DigitsDataModule, TabularMLP

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
ROOT = tempfile.mkdtemp()
QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=ROOT)"""),
    ("md", """## 1. Z-score vs raw features on breast-cancer

The 30 raw features span five orders of magnitude. Same MLP, same seed, same 40 steps, with and without
`ZScoreNormalization`; validation uses the *training* statistics."""),
    ("code", """def train_tabular(callbacks, steps=40, seed=1):
    L.seed_everything(seed, verbose=False)
    module, dm = TabularMLP(), BreastCancerDataModule()
    L.Trainer(callbacks=callbacks, max_steps=steps, limit_val_batches=0, **QUIET).fit(module, datamodule=dm)
    metrics = L.Trainer(callbacks=callbacks, **QUIET).validate(module, datamodule=dm, verbose=False)[0]
    return module, dm, metrics

zscore = ZScoreNormalization()
results = {"raw": train_tabular([]), "zscore": train_tabular([zscore]), "minmax": train_tabular([MinMaxNormalization()])}
for name, (_, _, m) in results.items():
    print(f"{name:7s} val_acc={m['val_acc']:.3f} val_loss={m['val_loss']:.3f}")"""),
    ("code", """_, dm, _ = results["zscore"]
raw = dm.train_dataset.inputs
scaled = zscore.export_module()(raw)
fig, ax = plt.subplots(figsize=(7, 2.5))
ax.bar(range(30), raw.std(0), label="raw std")
ax.bar(range(30), scaled.std(0, unbiased=False), label="after Z-score", alpha=0.8)
ax.set_yscale("log"); ax.set_xlabel("feature"); ax.legend(); ax.set_title("per-feature std of the training split")
plt.tight_layout(); plt.show()
print("train mean after:", float(scaled.mean(0).abs().max()), " train std after:", scaled.std(0, unbiased=False)[:3])"""),
    ("md", """## 2. Export with the model

`export_module()` returns a plain `Standardize(mean, std)` module: prepend it and the pipeline takes raw features,
giving exactly what `trainer.predict` (which applied the same transform) gave."""),
    ("code", """module, dm, _ = results["zscore"]
preds = torch.cat(L.Trainer(callbacks=[zscore], **QUIET).predict(module, datamodule=dm))
pipeline = nn.Sequential(zscore.export_module(), module).eval()
with torch.no_grad():
    same = torch.equal(pipeline(dm.test_dataset.inputs).softmax(1), preds)
print(pipeline[0], "| identical to trainer.predict:", same)"""),
    ("md", """## 3. Input noise and its schedule

`InputNoise(kind, scale, final_scale, schedule)` adds Gaussian / uniform / salt-and-pepper noise in training only;
the scale follows the schedule over the run's optimizer steps."""),
    ("code", """steps = range(0, 101)
fig, ax = plt.subplots(figsize=(6, 2.5))
for schedule in ("constant", "linear", "cosine", "exponential"):
    ax.plot(steps, [scheduled_scale(s, 100, 0.3, 0.01, schedule) for s in steps], label=schedule)
ax.set_xlabel("optimizer step"); ax.set_ylabel("noise scale"); ax.legend(); plt.tight_layout(); plt.show()"""),
    ("md", """## 4. Image augmentation (kornia), MixUp and CutMix on digits"""),
    ("code", """dm = DigitsDataModule(); dm.setup()
x, y = dm.train_dataset.inputs[:6], dm.train_dataset.targets[:6]
aug = build_augmentation(hflip_p=0.0, rotation_degrees=25, rotation_p=1.0, brightness=0.3, contrast=0.3, color_p=1.0)
augmented = augment_images(aug, x, seed=0)
perm = torch.roll(torch.arange(6), 1)
mixed, mixed_y = mixup(x, soft_targets(y, 10), 0.6, perm)
import numpy as np
box = cutmix_box(8, 8, 0.6, np.random.default_rng(0))
cut, cut_y, lam = cutmix(x, soft_targets(y, 10), box, perm)
fig, axes = plt.subplots(4, 6, figsize=(6, 4.2))
for row, (images, title) in enumerate([(x, "raw"), (augmented, "kornia"), (mixed, "MixUp 0.6"), (cut, f"CutMix {lam:.2f}")]):
    for i in range(6):
        axes[row, i].imshow(images[i, 0], cmap="gray_r"); axes[row, i].axis("off")
    axes[row, 0].set_title(title, fontsize=8, loc="left")
plt.tight_layout(); plt.show()
print("MixUp targets of image 0:", {k: round(float(v), 2) for k, v in enumerate(mixed_y[0]) if v > 0})
print("CutMix targets of image 0:", {k: round(float(v), 2) for k, v in enumerate(cut_y[0]) if v > 0})"""),
    ("md", """## 5. All together on a stock Trainer

Training batches are noised, augmented and mixed (soft targets into the module's own `CrossEntropyLoss`);
validation batches are untouched, so `val_acc` is computed on clean images with hard labels."""),
    ("code", """class Peek(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_targets = batch[1]
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val_targets = batch[1]

L.seed_everything(0, verbose=False)
peek = Peek()
callbacks = [InputNoise(scale=0.1, final_scale=0.0, schedule="cosine", clip=[0.0, 1.0]),
             ImageAugmentation(hflip_p=0.0, rotation_degrees=10, brightness=0.2), MixUp(alpha=0.2), peek]
trainer = L.Trainer(callbacks=callbacks, max_epochs=3, **QUIET)
trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
print("train targets:", tuple(peek.train_targets.shape), peek.train_targets.dtype,
      "| val targets:", tuple(peek.val_targets.shape), peek.val_targets.dtype)
print("val_acc after 3 epochs:", round(float(trainer.callback_metrics["val_acc"]), 3))"""),
]

