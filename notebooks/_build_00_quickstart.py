"""Builds notebooks/00_quickstart.ipynb (quick start): ``python notebooks/_build_00_quickstart.py`` from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "00_quickstart.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Quick start: techniques on a stock Trainer

Every technique in `lightning_techniques` is a Lightning callback (or plugin) added to a plain `lightning.Trainer`; the `LightningModule` stays as it is. This notebook trains on scikit-learn's bundled handwritten digits (no download) and shows two techniques doing what they promise:

1. **`LSUVInit`** (Mishkin & Matas 2016) lets a 20-layer plain MLP train where the default initialisation does not;
2. **`EarlyStopping`** stops when validation stops improving *and hands back the best weights*."""),
    ("code", """import logging, tempfile, warnings
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import EarlyStopping, LSUVInit
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule

torch.set_num_threads(1)  # tiny models: one thread is fastest
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
root = tempfile.mkdtemp()

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)

class Losses(Callback):
    def __init__(self): self.values = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs['loss']))"""),
    ("md", """## LSUV vs. the default initialisation, side by side

Same seed, same data order, same optimizer; the only difference is `callbacks=[LSUVInit()]`."""),
    ("code", """curves = {}
for name, extra in [('default init', []), ('LSUVInit', [LSUVInit()])]:
    L.seed_everything(0, verbose=False)
    losses = Losses()
    trainer(max_steps=150, limit_val_batches=0, callbacks=extra + [losses]).fit(
        DeepMLP(depth=20), datamodule=DigitsDataModule())
    curves[name] = losses.values
    if extra:
        report = extra[0].report

fig, ax = plt.subplots(figsize=(6, 3))
for name, values in curves.items():
    ax.plot(values, label=name)
ax.axhline(2.3026, ls=':', c='grey', label='chance (ln 10)')
ax.set_xlabel('step'); ax.set_ylabel('training loss'); ax.set_title('20-layer MLP on digits'); ax.legend()
plt.show()
{name: round(sum(v[-10:]) / 10, 3) for name, v in curves.items()}"""),
    ("md", """LSUV's per-layer report: output variance before and after scaling, on the first batch."""),
    ("code", """for row in report[:4] + report[-2:]:
    print(f"{row['layer']:>7}: {row['variance_before']:.4f} -> {row['variance_after']:.3f} "
          f"({row['iterations']} iterations)")"""),
    ("md", """## Early stopping that restores the best weights, beside Lightning's own

Once the CNN has converged, the validation loss wanders from epoch to epoch. The same run (same seed, same data order, `patience=3`) with Lightning's `EarlyStopping` and with ours: both stop at the same epoch, but Lightning's hands back the model of the *last* epoch, ours that of the *best* one."""),
    ("code", """from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping

class ValLoss(Callback):
    def __init__(self): self.values = []
    def on_validation_end(self, trainer, module):
        if trainer.state.fn == 'fit':
            self.values.append(float(trainer.callback_metrics['val_loss']))

runs = {}
for name, make in [("Lightning's EarlyStopping", lambda: LightningEarlyStopping(monitor='val_loss', patience=3)),
                   ('lightning_techniques.EarlyStopping', lambda: EarlyStopping(monitor='val_loss', patience=3))]:
    L.seed_everything(0, verbose=False)
    early, history = make(), ValLoss()
    model, data = DigitsCNN(), DigitsDataModule()
    t = trainer(max_epochs=30, callbacks=[early, history])
    t.fit(model, datamodule=data)
    (after,) = t.validate(model, datamodule=data, verbose=False)
    runs[name] = (history.values, early.stopped_epoch, after['val_loss'])

fig, ax = plt.subplots(figsize=(6.5, 3))
values = runs["Lightning's EarlyStopping"][0]
best = min(range(len(values)), key=values.__getitem__)
ax.plot(values, 'o-', ms=3, c='grey', label='val_loss per epoch (the same in both runs)')
for (name, (_, stopped, returned)), colour in zip(runs.items(), ['tab:red', 'tab:green']):
    ax.axhline(returned, c=colour, ls='--', label=f'returned by {name}: {returned:.4f}')
ax.axvline(best, c='tab:green', ls=':', lw=1, label=f'best epoch {best}')
ax.set_xlabel('epoch'); ax.set_ylabel('val_loss'); ax.set_yscale('log'); ax.legend(fontsize=7); plt.tight_layout(); plt.show()
for name, (values, stopped, returned) in runs.items():
    print(f'{name:36s} stopped after epoch {stopped} of 30; val_loss of the returned model {returned:.4f} '
          f'(best {min(values):.4f}, last {values[-1]:.4f})')"""),
    ("md", """## The same run from YAML

`lightning-techniques fit --config configs/digits.yaml` builds exactly this through Lightning's own `LightningCLI`; `build_from_yaml` does it in-process:"""),
    ("code", """from lightning_techniques.testing import build_from_yaml

config = {
    'trainer': {'max_epochs': 1, 'default_root_dir': root, 'callbacks': [
        {'class_path': 'lightning_techniques.LSUVInit', 'init_args': {'tolerance': 0.05}},
        {'class_path': 'lightning_techniques.EarlyStopping', 'init_args': {'monitor': 'val_loss', 'patience': 3}},
    ]},
    'model': {'class_path': 'lightning_techniques.demo.DeepMLP', 'init_args': {'depth': 20}},
    'data': {'class_path': 'lightning_techniques.demo.DigitsDataModule'},
}
cli = build_from_yaml(config)
[type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__module__.startswith('lightning_techniques')]"""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
