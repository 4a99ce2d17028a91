"""Builds notebooks/03_evaluation_and_interpretation.ipynb (evaluation and interpretation): ``python notebooks/_build_03_evaluation_and_interpretation.py`` from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "03_evaluation_and_interpretation.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# 03 - Evaluation report, permutation / ablation importance, t-SNE and attention maps

Four callbacks that you attach to a stock `lightning.Trainer`, with the demo's unmodified modules:

* `EvaluationReport` - accuracy, balanced accuracy, precision/recall/F1 (macro, micro, per class), AUROC, average
  precision, confusion matrix, calibration error (ECE) with a reliability diagram; bootstrap confidence intervals at test.
* `PermutationImportance` - how much accuracy drops when an input feature is permuted or a layer's output removed.
* `TSNELogger` - t-SNE (van der Maaten & Hinton 2008) of the penultimate-layer embeddings, coloured by label.
* `AttentionMapLogger` - attention maps of the demo transformer, which uses SDPA (no weights returned): they are
  recomputed from the hooked q/k projections, without changing the model's outputs; the same on a Hugging Face BERT.

Everything is written under the run's directory (a temporary one here)."""),
    ("code", """import tempfile, warnings, logging
warnings.filterwarnings("ignore")  # first: shap's tqdm import warns that ipywidgets is missing
from pathlib import Path

import lightning as L
import torch
from IPython.display import Image, Markdown, display

from lightning_techniques import AttentionMapLogger, EvaluationReport, PermutationImportance, TSNELogger
from lightning_techniques.demo import BreastCancerDataModule, DigitsDataModule, TabularMLP, TinyTransformer

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(1)  # tiny models: one thread is fastest
root = Path(tempfile.mkdtemp(prefix="lt_nb03_"))

def newest(pattern):
    return sorted(root.rglob(pattern))[-1]"""),
    ("md", """## Train the demo transformer with the report, t-SNE and attention loggers attached

The report hooks the module's own forward pass (no second evaluation pass); the t-SNE and attention loggers hook
layers during the same pass, on rank 0 only."""),
    ("code", """L.seed_everything(0, verbose=False)
dm = DigitsDataModule(batch_size=64)
model = TinyTransformer()
report = EvaluationReport(class_names=[str(i) for i in range(10)], bootstrap_resamples=100)
tsne = TSNELogger(every_n_val_epochs=0)                           # at test end only
attention = AttentionMapLogger(every_n_val_epochs=0, style="figure")  # at test end only
trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                    callbacks=[report, tsne, attention])
trainer.fit(model, datamodule=dm)
results = trainer.test(model, datamodule=dm, verbose=False)[0]
print(f"module's own test_acc: {results['test_acc']:.4f}   report accuracy: {report.results['test']['scalars']['accuracy']:.4f}")"""),
    ("md", """### The test report: every metric with its 95% bootstrap interval"""),
    ("code", """display(Markdown(newest("test_metrics_step*.md").read_text()))"""),
    ("code", """display(Image(filename=str(newest("test_confusion_matrix_step*.png")), width=380))
display(Image(filename=str(newest("test_reliability_step*.png")), width=300))"""),
    ("md", """## t-SNE of the penultimate embedding (input of the `head` layer)

The 5-NN accuracy inside the 2-D map measures how well the classes separate (chance is 0.1)."""),
    ("code", """print(f"5-NN accuracy in the t-SNE map: {tsne.last['knn_accuracy']:.3f} ({len(tsne.last['labels'])} samples, stage {tsne.last['stage']})")
display(Image(filename=str(newest("tsne/*.png")), width=380))"""),
    ("md", """## Attention maps of both blocks (rows: layers, columns: heads) for one test digit

Each row of a map is a softmax over the 8 image rows (tokens): it sums to 1."""),
    ("code", """maps = attention.last_maps
for name, m in maps.items():
    print(name, tuple(m.shape), "row sums:", m.sum(-1).min().item(), "to", m.sum(-1).max().item())
display(Image(filename=str(newest("attention/test_sample0_step*.png")), width=520))"""),
    ("md", """## Attention maps of a Hugging Face `transformers` model

The same callback on the demo's `TinyBert` - a Hugging Face `BertForSequenceClassification` built from a config
(no download) that runs SDPA - on padded token sequences whose label is "token 7 occurs" (`TokenPresenceDataModule`).
transformers' own `output_attentions=True` would need `attn_implementation="eager"`; the logger recomputes the
weights from the query, key and padding mask the SDPA kernel received, so the model keeps its kernel and its outputs.
The check below compares them with transformers' eager weights on the same trained parameters."""),
    ("code", """from lightning_techniques.demo import TinyBert, TokenPresenceDataModule

L.seed_everything(0, verbose=False)
bert, tokens = TinyBert(), TokenPresenceDataModule()
hf_attention = AttentionMapLogger(layers=["*.attention.self"], every_n_val_epochs=0, style="figure")
trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(root / "bert"), callbacks=[hf_attention])
trainer.fit(bert, datamodule=tokens)
print(f"test accuracy: {trainer.test(bert, datamodule=tokens, verbose=False)[0]['test_acc']:.3f}")

eager = TinyBert(attn_implementation="eager").eval()
eager.load_state_dict(bert.state_dict())
ids = tokens.test_dataset.inputs[:1]
with torch.no_grad():
    reference = eager.model(input_ids=ids, attention_mask=(ids != 0).long(), output_attentions=True).attentions
for i, (name, m) in enumerate(hf_attention.last_maps.items()):
    print(f"{name}: {tuple(m.shape)}, max |captured - eager output_attentions| = {(m - reference[i]).abs().max():.1e}")
print("tokens of the first test sequence:", ids[0].tolist(), " (0 = padding)")
display(Image(filename=str(newest("bert/**/attention/test_sample0_step*.png")), width=520))"""),
    ("md", """Padded positions (right of the sequence) get no attention, and in layer 0 every position looks at the
token that decides the label (7), when the sequence has one."""),
    ("md", """## Permutation and ablation importance on the breast-cancer data

The 30 features are the raw (unscaled) measurements; the importance of a feature is the accuracy lost when it is
shuffled across patients. Ablation zeroes a hidden layer's output."""),
    ("code", """from sklearn.datasets import load_breast_cancer

L.seed_everything(0, verbose=False)
names = [n.replace(" ", "_") for n in load_breast_cancer().feature_names]
bc = BreastCancerDataModule()
importance = PermutationImportance(layers=["net.0", "net.2"], feature_names=names, n_repeats=5)
trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root / "bc"),
                    callbacks=[importance])
tab = TabularMLP()
trainer.fit(tab, datamodule=bc)
trainer.test(tab, datamodule=bc, verbose=False)
res = importance.results["test"]
print(f"baseline test accuracy {res['baseline']:.3f}; layer ablation drops: {res['layers']}")
order = res["features"].flatten().argsort(descending=True)[:5].tolist()
spread = bc.train_dataset.inputs.std(dim=0)
print("largest accuracy drops:", ", ".join(f"{names[j]} ({float(res['features'].flatten()[j]):.3f}, feature std {float(spread[j]):.0f})" for j in order))
display(Image(filename=str(newest("importance/test_features_step*.png")), width=420))"""),
    ("md", """Two raw features with the largest spreads, `worst_area` and `mean_area` (standard deviations in the hundreds), carry almost all of the importance; shuffling most other features costs nothing. On unscaled inputs the network effectively uses the features with the largest ranges - one reason to normalise inputs (see the normalisation techniques in notebook 01)."""),
    ("md", """# Part 2: attribution loggers - saliency, Integrated Gradients, DeepLIFT, Grad-CAM, SHAP, LIME

Each logger is a callback on a stock `lightning.Trainer`. It picks a fixed set of validation samples once (one per class, or the most confidently wrong), and every `every_n_epochs` validation runs (and at test end) writes, on rank 0 only, an overlay image, the raw attribution arrays and a samples table to whatever logger is attached (files under `<log_dir>/artifacts/` in any case). They work inside Lightning's `inference_mode` evaluation and leave the model's modes, `requires_grad` flags and the random state as they found them.

1. All six on the bundled digits with `DigitsCNN`.
2. Evidence on a task whose answer is known: does the attribution land on the one informative patch?"""),
    ("code", """import logging, tempfile, warnings
from pathlib import Path
import lightning as L
import numpy as np
import torch
from IPython.display import Image, display

from lightning_techniques import (DeepLiftLogger, GradCAMLogger, IntegratedGradientsLogger, LIMELogger,
                                  SaliencyLogger, SHAPLogger)
from lightning_techniques.functional import mass_fraction
from lightning_techniques.demo import ClassifierModule, DigitsCNN, DigitsDataModule, LabeledTensorDataset

warnings.filterwarnings('ignore')
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
torch.set_num_threads(1)  # tiny models: one thread is fastest
root = Path(tempfile.mkdtemp())

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)"""),
    ("md", """## 1. Six loggers on digits

Grad-CAM finds the last `nn.Conv2d` itself (`features.5`); SHAP uses `DeepExplainer` because `DigitsCNN` is built from modules it understands (`explainer='auto'`), with 32 training images as background; LIME explains the 5 most confidently wrong samples over 2x2 superpixels."""),
    ("code", """L.seed_everything(0, verbose=False)
common = dict(every_n_epochs=8, max_samples=10)
loggers = [SaliencyLogger(**common), IntegratedGradientsLogger(n_steps=32, **common), DeepLiftLogger(**common),
           GradCAMLogger(**common), SHAPLogger(explainer='auto', background_size=32, **common),
           LIMELogger(n_samples=100, selection='confident_wrong', every_n_epochs=8, max_samples=5)]
model, data = DigitsCNN(channels=16, lr=1e-2), DigitsDataModule(batch_size=32)
t = trainer(max_epochs=8, callbacks=loggers, default_root_dir=str(root / 'digits'))  # logs at epoch 8
t.fit(model, datamodule=data)
print('val_acc', round(float(t.callback_metrics['val_acc']), 3), '| Grad-CAM layer:', loggers[3].resolved_layer,
      '| SHAP explainer:', loggers[4].explainer_used)
artefacts = root / 'digits' / 'artifacts'
sorted(str(p.relative_to(artefacts)) for p in artefacts.rglob('*overlay*'))"""),
    ("md", """Top row: the inputs (one per class, 0 to 9); bottom row: the attribution magnitude over them."""),
    ("code", """for name in ['saliency', 'integrated_gradients', 'deeplift', 'gradcam', 'shap', 'lime']:
    print(name)
    display(Image(filename=str(next((artefacts / name / 'val').glob('overlay_*.png')))))"""),
    ("md", """Integrated Gradients reports its **completeness check** each time: the attributions of a sample sum to `f(x) - f(baseline)` of the explained logit, up to the error of the 32-point path integral."""),
    ("code", """print((next((artefacts / 'integrated_gradients' / 'val').glob('completeness_*.md'))).read_text())
{k: round(v, 5) for k, v in loggers[1].history[-1].items() if isinstance(v, float)}"""),
    ("md", """## 2. Evidence: a task whose answer is known

12x12 noise images; class 1 iff a bright 3x3 patch sits at one of two fixed places. A tiny CNN learns it in a few dozen steps. A faithful attribution of a class-1 sample puts its mass on the patch, which covers only 9/144 = 6% of the image."""),
    ("code", """def patch_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 12, 12, generator=g) * 0.5, torch.randint(0, 2, (n,), generator=g)
    mask = torch.zeros(n, 12, 12, dtype=torch.bool)
    for i, (r, c) in enumerate([((2, 2), (7, 7))[k] for k in torch.randint(0, 2, (n,), generator=g)]):
        mask[i, r:r + 3, c:c + 3] = True
        x[i, 0, r:r + 3, c:c + 3] += float(y[i])
    return LabeledTensorDataset(x, y), mask

class PatchData(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        (self.train_set, _), (self.val_set, self.val_mask) = patch_data(512, 1), patch_data(64, 2)
    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=32, shuffle=True)
    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val_set, batch_size=64)

class PatchCNN(ClassifierModule):
    def __init__(self):
        super().__init__(lr=2e-2)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 2)
    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))

L.seed_everything(0, verbose=False)
kw = dict(every_n_epochs=4, samples_per_class=4, max_samples=8, explain='label')
patch_loggers = [SaliencyLogger(**kw), IntegratedGradientsLogger(**kw), DeepLiftLogger(**kw), GradCAMLogger(**kw),
                 SHAPLogger(explainer='auto', **kw),
                 LIMELogger(superpixel_size=1, n_samples=300, **{**kw, 'samples_per_class': 1})]  # LIME: slowest
pdata = PatchData()
t = trainer(max_epochs=4, limit_train_batches=12, callbacks=patch_loggers, default_root_dir=str(root / 'patch'))
t.fit(PatchCNN(), datamodule=pdata)
print('val_acc', float(t.callback_metrics['val_acc']))"""),
    ("code", """print(f"{'method':>22}  attribution mass on the patch (class-1 samples; patch area = {9 / 144:.1%})")
for logger in patch_loggers:
    idx = logger.indices['val']
    positive = pdata.val_set.targets[idx] == 1
    frac = mass_fraction(logger.last['attributions'][positive], pdata.val_mask[idx][positive])
    print(f'{logger.name:>22}  mean {frac.mean():.0%}   min {frac.min():.0%}')"""),
    ("code", """patch_art = root / 'patch' / 'artifacts'
for name in ['integrated_gradients', 'gradcam']:
    print(name, '(first 4 columns: class 0, last 4: class 1)')
    display(Image(filename=str(next((patch_art / name / 'val').glob('overlay_*.png')))))"""),
    ("md", """Five of the six methods put most of their mass (51-81%) on the 6% of the image that decides the class; vanilla saliency, the noisiest, puts about 30% there - still about five times the patch's share of the area. Cost: see `benchmarks/attribution_cost.py` (seconds per logging event vs. the epoch time) in `benchmarks/RESULTS.md`."""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
