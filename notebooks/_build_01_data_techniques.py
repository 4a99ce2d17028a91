"""Builds (and executes, saving the outputs) notebooks/01_data_techniques.ipynb.

Run from the repository root: ``python notebooks/_build_01_data_techniques.py``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
PATH = HERE / "01_data_techniques.ipynb"

cells: list[tuple[str, str]] = [
    ("md", """# Data techniques: curriculum learning and class imbalance

Three callbacks for a stock `lightning.Trainer` and an unmodified `LightningModule`:

* `CurriculumLearning` - easy samples first, the pool growing with a pacing function (Bengio et al. 2009;
  Hacohen & Weinshall 2019; Platanios et al. 2019);
* `ClassWeightedLoss` - class weights (inverse frequency, inverse sqrt, effective number of samples of Cui et al. 2019)
  or a focal loss (Lin et al. 2017), applied to the module's own criterion;
* `Oversampling` - a weighted draw of the training set that rebalances the classes.

All run on the bundled scikit-learn digits data; everything is written to a temporary directory."""),
    ("code", """import math, tempfile, warnings, logging
import torch, lightning as L
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from IPython.display import Image, display
from lightning_techniques import ClassWeightedLoss, CurriculumLearning, Oversampling
from lightning_techniques.data import class_counts, class_weights, difficulty_ranking, find_labels, pacing_fraction
from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.demo.data import LabeledTensorDataset

warnings.filterwarnings("ignore")
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

L.seed_everything(0)
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
    L.seed_everything(0)
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
    L.seed_everything(0)
    module, data = DeepMLP(depth=3, lr=0.05), DigitsDataModule(batch_size=64, keep_fraction=cut)
    trainer(max_steps=80, limit_val_batches=0, callbacks=make()).fit(module, datamodule=data)
    print(f"{name:>34}: balanced accuracy {balanced_accuracy(module, data):.3f}")
print("weights in use were restored after fit:", module.criterion.weight is None)"""),
    ("md", """The module's criterion is changed only for the run (non-persistent buffers, restored at teardown), so its
checkpoint stays loadable into the plain module."""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    from _cells_01_transforms import cells as transform_cells  # part 2, kept in its own file

    for kind, src in cells + transform_cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


if __name__ == "__main__":
    import tempfile
    import time

    notebook = build()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    print(f"executed in {time.perf_counter() - start:.1f} s")
    nbformat.write(notebook, PATH)
