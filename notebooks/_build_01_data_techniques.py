"""Builds notebooks/01_data_techniques.ipynb (data techniques): ``python notebooks/_build_01_data_techniques.py`` from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "01_data_techniques.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Data techniques: curriculum learning and class imbalance

Three callbacks for a stock `lightning.Trainer` and an unmodified `LightningModule`:

* `CurriculumLearning` - easy samples first, the pool growing with a pacing function (Bengio et al. 2009;
  Hacohen & Weinshall 2019; Platanios et al. 2019);
* `ClassWeightedLoss` - class weights (inverse frequency, inverse sqrt, effective number of samples of Cui et al. 2019)
  or a focal loss (Lin et al. 2017), applied to the module's own criterion;
* `Oversampling` - a weighted draw of the training set that rebalances the classes.

All run on the bundled scikit-learn digits data; everything is written to a temporary directory."""),
    ("code", """import math, tempfile, warnings, logging
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import torch, lightning as L
import matplotlib.pyplot as plt
from IPython.display import Image, display
from lightning_techniques import ClassWeightedLoss, CurriculumLearning, Oversampling
from lightning_techniques.data import class_counts, class_weights, difficulty_ranking, find_labels, pacing_fraction
from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.demo.data import LabeledTensorDataset

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(1)
ROOT = tempfile.mkdtemp()

def trainer(**kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=ROOT, **kw)

def show(fig, name):
    path = f"{ROOT}/{name}.png"
    fig.savefig(path, dpi=70, bbox_inches="tight")
    plt.close(fig)
    display(Image(path))"""),
    ("md", """## 1. Pacing functions

The fraction of the difficulty-sorted training set that may be drawn at progress `t` (steps or epochs), from
`start_fraction` to 1 at `full_at`. `root` is Platanios et al.'s square-root competence; `step` grows in jumps."""),
    ("code", """fig, ax = plt.subplots(figsize=(5, 3))
T = 100
for kind in ["linear", "root", "geometric", "step"]:
    ax.plot([pacing_fraction(t, T, 0.2, kind, stages=4) for t in range(130)], label=kind)
ax.set_xlabel("step"); ax.set_ylabel("pool fraction"); ax.legend(); ax.set_title("start_fraction=0.2, full_at=100")
show(fig, "pacing")"""),
    ("md", """## 2. A curriculum on digits

Difficulty here: how atypical an image is - its distance to the mean image of its class (any per-sample array
works; `difficulty="self_paced"` or `"teacher"` score by a model's loss instead). To *see* what the sampler does,
the training set records which indices the loader reads."""),
    ("code", """class RecordingDataset(LabeledTensorDataset):
    def __init__(self, inputs, targets):
        super().__init__(inputs, targets)
        self.seen = []
    def __getitem__(self, i):
        self.seen.append(int(i))
        return super().__getitem__(i)

class RecordingDigits(DigitsDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        if not isinstance(self.train_dataset, RecordingDataset):
            self.train_dataset = RecordingDataset(self.train_dataset.inputs, self.train_dataset.targets)

dm = RecordingDigits(batch_size=64)
dm.setup()
x, y = dm.train_dataset.inputs.flatten(1), dm.train_dataset.targets
means = torch.stack([x[y == c].mean(0) for c in range(10)])
difficulty = (x - means[y]).norm(dim=1)          # distance to the class mean

L.seed_everything(0, verbose=False)
curriculum = CurriculumLearning(difficulty=difficulty, pacing="root", start_fraction=0.15, full_at=30)
model = DeepMLP(depth=3, lr=0.05)   # a small MLP: fast on CPU
trainer(max_steps=40, limit_val_batches=0, callbacks=[curriculum]).fit(model, datamodule=dm)

n = len(y)
rank_of = torch.empty(n, dtype=torch.long)
rank_of[difficulty_ranking(difficulty)] = torch.arange(n)
seen = torch.tensor(dm.train_dataset.seen[: 40 * 64])
steps = torch.arange(len(seen)) // 64
fig, ax = plt.subplots(figsize=(6, 3))
ax.scatter(steps, rank_of[seen] / n, s=2, alpha=0.4, label="drawn samples")
ax.plot(range(40), [pacing_fraction(k, 30, 0.15, "root") for k in range(40)], "r", label="pool fraction")
ax.set_xlabel("training step"); ax.set_ylabel("difficulty rank (0 = easiest)"); ax.legend(loc="lower right")
show(fig, "curriculum_draws")
print("step 0: hardest rank drawn", int(rank_of[seen[:64]].max()), "of", n, "| pool", math.ceil(0.15 * n))"""),
    ("md", """Every batch comes from the current pool (below the red line); after `full_at` the whole set is drawn.
Under DDP each rank draws a disjoint share of the same global order, and a mid-epoch checkpoint resumes the same
pool, permutation and position (see `tests/test_data_curriculum.py`)."""),
    ("md", """## 3. Class imbalance: digits with classes 0, 1, 2 cut to 5 %

Labels are read from the dataset's `targets` attribute (no image is loaded)."""),
    ("code", """cut = {0: 0.05, 1: 0.05, 2: 0.05}
imb = DigitsDataModule(batch_size=64, keep_fraction=cut)
imb.setup()
counts = class_counts(find_labels(imb.train_dataset))
print("training samples per class:", counts.long().tolist())
for mode in ["inverse", "inverse_sqrt", "effective"]:
    print(f"{mode:>13}:", [round(v, 2) for v in class_weights(counts, mode, beta=0.99).tolist()])"""),
    ("md", """### Oversampling: what the loader draws in one epoch"""),
    ("code", """from lightning.pytorch.callbacks import Callback

class LabelProbe(Callback):
    def __init__(self):
        self.labels = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels.append(batch[1])

drawn = {}
for name, cbs in {"plain shuffle": [], "Oversampling(inverse)": [Oversampling(mode="inverse")]}.items():
    probe = LabelProbe()
    L.seed_everything(0, verbose=False)
    trainer(max_epochs=1, limit_val_batches=0, callbacks=cbs + [probe]).fit(
        DeepMLP(depth=3, lr=0.05), datamodule=DigitsDataModule(batch_size=64, keep_fraction=cut))
    drawn[name] = torch.bincount(torch.cat(probe.labels), minlength=10)

fig, ax = plt.subplots(figsize=(6, 2.8))
for i, (name, c) in enumerate(drawn.items()):
    ax.bar(torch.arange(10) + 0.4 * i - 0.2, c, width=0.4, label=name)
ax.set_xlabel("class"); ax.set_ylabel("samples drawn in epoch 0"); ax.legend()
show(fig, "oversampling")"""),
    ("md", """### Weighted loss vs. baseline: balanced accuracy on the balanced test split

A short run (80 steps of a 3-layer MLP) per variant, same seed; the benchmark `python -m benchmarks.imbalance` does this properly
over several seeds and on breast-cancer too (results in `benchmarks/RESULTS.md`)."""),
    ("code", """def balanced_accuracy(module, dm):
    dm.setup("test")
    x, y = dm.test_dataset.inputs, dm.test_dataset.targets
    with torch.no_grad():
        pred = module.eval()(x).argmax(1)
    return torch.stack([(pred[y == c] == c).float().mean() for c in range(10)]).mean().item()

for name, make in {"baseline": lambda: [],
                   "ClassWeightedLoss(inverse)": lambda: [ClassWeightedLoss(mode="inverse")],
                   "ClassWeightedLoss(focal, gamma=2)": lambda: [ClassWeightedLoss(mode="effective", focal_gamma=2.0)],
                   "Oversampling(inverse)": lambda: [Oversampling()]}.items():
    L.seed_everything(0, verbose=False)
    module, data = DeepMLP(depth=3, lr=0.05), DigitsDataModule(batch_size=64, keep_fraction=cut)
    trainer(max_steps=80, limit_val_batches=0, callbacks=make()).fit(module, datamodule=data)
    print(f"{name:>34}: balanced accuracy {balanced_accuracy(module, data):.3f}")
print("weights in use were restored after fit:", module.criterion.weight is None)"""),
    ("md", """The module's criterion is changed only for the run (non-persistent buffers, restored at teardown), so its
checkpoint stays loadable into the plain module."""),
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

from lightning_techniques import CutMix, ImageAugmentation, InputNoise, MinMaxNormalization, MixUp, ZScoreNormalization
from lightning_techniques.functional import (
    augment_images,
    build_augmentation,
    cutmix,
    mixup,
    scheduled_scale,
    soft_targets,
)
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
validation batches are untouched, so `val_acc` is computed on clean images with hard labels.

The same CNN, seed and data order without any technique runs beside it. Three epochs are a short run: regularising augmentation usually pays off over longer training, so read the two numbers as what they are, a check that the stack trains, not as a verdict."""),
    ("code", """class Peek(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_targets = batch[1]
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val_targets = batch[1]

results = {}
for name, techniques in [("baseline (no technique)", []),
                         ("noise + kornia + MixUp", [InputNoise(scale=0.1, final_scale=0.0, schedule="cosine", clip=[0.0, 1.0]),
                                                     ImageAugmentation(hflip_p=0.0, rotation_degrees=10, brightness=0.2),
                                                     MixUp(alpha=0.2)])]:
    L.seed_everything(0, verbose=False)
    peek = Peek()
    trainer = L.Trainer(callbacks=techniques + [peek], max_epochs=3, **QUIET)
    trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())
    results[name] = float(trainer.callback_metrics["val_acc"])
    print(f"{name:24s} train targets {tuple(peek.train_targets.shape)} {peek.train_targets.dtype} | "
          f"val targets {tuple(peek.val_targets.shape)} {peek.val_targets.dtype} | val_acc after 3 epochs {results[name]:.3f}")"""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
