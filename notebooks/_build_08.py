"""Builds (and executes, saving outputs) notebooks/08_evaluation_and_interpretation.ipynb.

    python notebooks/_build_08.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
PATH = HERE / "08_evaluation_and_interpretation.ipynb"

cells = [
    ("md", """# 08 - Evaluation report, permutation / ablation importance, t-SNE and attention maps

Four callbacks that you attach to a stock `lightning.Trainer`, with the demo's unmodified modules:

* `EvaluationReport` - accuracy, balanced accuracy, precision/recall/F1 (macro, micro, per class), AUROC, average
  precision, confusion matrix, calibration error (ECE) with a reliability diagram; bootstrap confidence intervals at test.
* `PermutationImportance` - how much accuracy drops when an input feature is permuted or a layer's output removed.
* `TSNELogger` - t-SNE (van der Maaten & Hinton 2008) of the penultimate-layer embeddings, coloured by label.
* `AttentionMapLogger` - attention maps of the demo transformer, which uses SDPA (no weights returned): they are
  recomputed from the hooked q/k projections, without changing the model's outputs; the same on a Hugging Face BERT.

Everything is written under the run's directory (a temporary one here)."""),
    ("code", """import tempfile, warnings, logging
from pathlib import Path

import lightning as L
import torch
from IPython.display import Image, Markdown, display

from lightning_techniques import AttentionMapLogger, EvaluationReport, PermutationImportance, TSNELogger
from lightning_techniques.demo import BreastCancerDataModule, DigitsDataModule, TabularMLP, TinyTransformer

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
torch.set_num_threads(2)
root = Path(tempfile.mkdtemp(prefix="lt_nb08_"))

def newest(pattern):
    return sorted(root.rglob(pattern))[-1]"""),
    ("md", """## Train the demo transformer with the report, t-SNE and attention loggers attached

The report hooks the module's own forward pass (no second evaluation pass); the t-SNE and attention loggers hook
layers during the same pass, on rank 0 only."""),
    ("code", """L.seed_everything(0)
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
    ("md", "### The test report: every metric with its 95% bootstrap interval"),
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

L.seed_everything(0)
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

L.seed_everything(0)
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
display(Image(filename=str(newest("importance/test_features_step*.png")), width=420))"""),
    ("md", """Unscaled features with large ranges (areas, perimeters) dominate what the network uses - one reason to
normalise inputs (see the normalisation techniques)."""),
]

from _cells_08_attributions import cells as attribution_cells  # noqa: E402  (part 2, kept in its own file)

nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src) for kind, src in cells]
nb.cells += attribution_cells
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    nbformat.write(nb, PATH)
    print(f"wrote {PATH}")
