"""Builds notebooks/00_quickstart.ipynb (run from the repo root: python notebooks/_build_00_quickstart.py)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

cells = [
    nbformat.v4.new_markdown_cell(
        "# Quick start: techniques on a stock Trainer\n\n"
        "Every technique in `lightning_techniques` is a Lightning callback (or plugin) added to a plain "
        "`lightning.Trainer`; the `LightningModule` stays as it is. This notebook trains on scikit-learn's bundled "
        "handwritten digits (no download) and shows two techniques doing what they promise:\n\n"
        "1. **`LSUVInit`** (Mishkin & Matas 2016) lets a 20-layer plain MLP train where the default initialisation "
        "does not;\n2. **`EarlyStopping`** stops when validation stops improving *and hands back the best weights*."
    ),
    nbformat.v4.new_code_cell(
        "import logging, tempfile, warnings\n"
        "import lightning as L\n"
        "import matplotlib.pyplot as plt\n"
        "from lightning.pytorch.callbacks import Callback\n\n"
        "from lightning_techniques import EarlyStopping, LSUVInit\n"
        "from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule\n\n"
        "warnings.filterwarnings('ignore')\n"
        "logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)\n"
        "root = tempfile.mkdtemp()\n\n"
        "def trainer(**kw):\n"
        "    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
        "                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)\n\n"
        "class Losses(Callback):\n"
        "    def __init__(self): self.values = []\n"
        "    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):\n"
        "        self.values.append(float(outputs['loss']))"
    ),
    nbformat.v4.new_markdown_cell(
        "## LSUV vs. the default initialisation, side by side\n\n"
        "Same seed, same data order, same optimizer; the only difference is `callbacks=[LSUVInit()]`."
    ),
    nbformat.v4.new_code_cell(
        "curves = {}\n"
        "for name, extra in [('default init', []), ('LSUVInit', [LSUVInit()])]:\n"
        "    L.seed_everything(0, verbose=False)\n"
        "    losses = Losses()\n"
        "    trainer(max_steps=150, limit_val_batches=0, callbacks=extra + [losses]).fit(\n"
        "        DeepMLP(depth=20), datamodule=DigitsDataModule())\n"
        "    curves[name] = losses.values\n"
        "    if extra:\n"
        "        report = extra[0].report\n\n"
        "fig, ax = plt.subplots(figsize=(6, 3))\n"
        "for name, values in curves.items():\n"
        "    ax.plot(values, label=name)\n"
        "ax.axhline(2.3026, ls=':', c='grey', label='chance (ln 10)')\n"
        "ax.set_xlabel('step'); ax.set_ylabel('training loss'); ax.set_title('20-layer MLP on digits'); ax.legend()\n"
        "plt.show()\n"
        "{name: round(sum(v[-10:]) / 10, 3) for name, v in curves.items()}"
    ),
    nbformat.v4.new_markdown_cell("LSUV's per-layer report: output variance before and after scaling, on the first batch."),
    nbformat.v4.new_code_cell(
        "for row in report[:4] + report[-2:]:\n"
        "    print(f\"{row['layer']:>7}: {row['variance_before']:.4f} -> {row['variance_after']:.3f} \"\n"
        "          f\"({row['iterations']} iterations)\")"
    ),
    nbformat.v4.new_markdown_cell(
        "## Early stopping that restores the best weights\n\n"
        "Once the CNN has converged, the validation loss wanders from epoch to epoch. Lightning's own `EarlyStopping` "
        "would leave the model at its *last* weights; ours restores those of the best epoch."
    ),
    nbformat.v4.new_code_cell(
        "class ValLoss(Callback):\n"
        "    def __init__(self): self.values = []\n"
        "    def on_validation_end(self, trainer, module):\n"
        "        if trainer.state.fn == 'fit':\n"
        "            self.values.append(float(trainer.callback_metrics['val_loss']))\n\n"
        "L.seed_everything(0, verbose=False)\n"
        "early, history = EarlyStopping(monitor='val_loss', patience=3), ValLoss()\n"
        "model, data = DigitsCNN(), DigitsDataModule()\n"
        "t = trainer(max_epochs=20, callbacks=[early, history])\n"
        "t.fit(model, datamodule=data)\n"
        "(after,) = t.validate(model, datamodule=data, verbose=False)\n"
        "print('val_loss per epoch :', [round(v, 4) for v in history.values])\n"
        "print(f'stopped early at epoch {early.stopped_epoch}' if early.stopped_epoch else 'ran all epochs', \n"
        "      f'- best epoch {early.best_epoch}')\n"
        "print(f\"val_loss of the returned model: {after['val_loss']:.4f} (best seen {float(early.best_score):.4f}, \"\n"
        "      f'last epoch {history.values[-1]:.4f})')"
    ),
    nbformat.v4.new_markdown_cell(
        "## The same run from YAML\n\n"
        "`lightning-techniques fit --config configs/digits.yaml` builds exactly this through Lightning's own "
        "`LightningCLI`; `build_from_yaml` does it in-process:"
    ),
    nbformat.v4.new_code_cell(
        "from lightning_techniques.testing import build_from_yaml\n\n"
        "config = {\n"
        "    'trainer': {'max_epochs': 1, 'default_root_dir': root, 'callbacks': [\n"
        "        {'class_path': 'lightning_techniques.LSUVInit', 'init_args': {'tolerance': 0.05}},\n"
        "        {'class_path': 'lightning_techniques.EarlyStopping', 'init_args': {'monitor': 'val_loss', 'patience': 3}},\n"
        "    ]},\n"
        "    'model': {'class_path': 'lightning_techniques.demo.DeepMLP', 'init_args': {'depth': 20}},\n"
        "    'data': {'class_path': 'lightning_techniques.demo.DigitsDataModule'},\n"
        "}\n"
        "cli = build_from_yaml(config)\n"
        "[type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__module__.startswith('lightning_techniques')]"
    ),
]

notebook = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}})
NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
path = Path(__file__).with_name("00_quickstart.ipynb")
nbformat.write(notebook, path)
print("wrote", path)
