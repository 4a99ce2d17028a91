"""Builds notebooks/02_optimization.ipynb (run from the repo root: python notebooks/_build_02.py)."""

import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

cells = [
    nbformat.v4.new_markdown_cell(
        "# Optimizers and learning-rate schedules without touching the module\n\n"
        "`OptimizerCallback` gives a stock `LightningModule` any of 14 optimizers by name (biases and norm weights "
        "excluded from weight decay), `LRSchedule` adds warm-up + decay / one-cycle / warm restarts stepped per "
        "optimizer step, and `ReduceLROnPlateau` reduces the LR on a plateau of a logged metric, agreed across "
        "DDP ranks. The module's `configure_optimizers` is never edited; the callbacks compose in any order.\n\n"
        "Data: scikit-learn's bundled 8x8 handwritten digits (no download)."
    ),
    nbformat.v4.new_code_cell(
        "import logging, tempfile, warnings\n"
        "import lightning as L\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n\n"
        "from lightning_techniques import LRSchedule, OptimizerCallback, ReduceLROnPlateau, lr_at\n"
        "from lightning_techniques.demo import DeepMLP, DigitsDataModule\n\n"
        "warnings.filterwarnings('ignore')\n"
        "torch.set_num_threads(1)  # tiny models: one thread is fastest\n"
        "logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)\n"
        "root = tempfile.mkdtemp()\n"
        "dm = DigitsDataModule(batch_size=64)\n\n"
        "def trainer(**kw):\n"
        "    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
        "                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)\n\n"
        "class LRRecorder(L.Callback):\n"
        "    def __init__(self): self.lrs = []\n"
        "    def on_before_optimizer_step(self, trainer, module, optimizer):\n"
        "        self.lrs.append(optimizer.param_groups[0]['lr'])"
    ),
    nbformat.v4.new_markdown_cell(
        "## The schedules: `lr_at(step, total, ...)`\n\n"
        "The functional core gives the LR multiplier at each optimizer step (unit-tested against torch's own "
        "schedulers). Here over a run of 200 optimizer steps, 20 of them warm-up:"
    ),
    nbformat.v4.new_code_cell(
        "total, steps = 200, range(200)\n"
        "curves = {\n"
        "    'cosine (warm-up 20, floor 0.05)': [lr_at(s, total, 'cosine', warmup_steps=20, min_ratio=0.05) for s in steps],\n"
        "    'linear (warm-up 20)': [lr_at(s, total, 'linear', warmup_steps=20) for s in steps],\n"
        "    'polynomial p=2': [lr_at(s, total, 'polynomial', warmup_steps=20, power=2.0) for s in steps],\n"
        "    'step (every 50, x0.5)': [lr_at(s, total, 'step', warmup_steps=20, step_size=50, gamma=0.5) for s in steps],\n"
        "    'exponential (x0.985)': [lr_at(s, total, 'exponential', warmup_steps=20, gamma=0.985) for s in steps],\n"
        "    'one-cycle': [lr_at(s, total, 'one_cycle') for s in steps],\n"
        "    'warm restarts (T0=30, x2)': [lr_at(s, total, 'cosine_restarts', cycle_steps=30, cycle_mult=2) for s in steps],\n"
        "}\n"
        "fig, ax = plt.subplots(figsize=(8.5, 3.2))\n"
        "for name, values in curves.items():\n"
        "    ax.plot(values, label=name)\n"
        "ax.set_xlabel('optimizer step'); ax.set_ylabel('LR / base LR')\n"
        "ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.0, 0.5))\n"
        "plt.tight_layout(); plt.show()"
    ),
    nbformat.v4.new_markdown_cell(
        "## Optimizers by name on an unmodified module\n\n"
        "`DeepMLP`'s own `configure_optimizers` returns SGD; `OptimizerCallback` replaces it for the run (and puts "
        "it back afterwards). L-BFGS runs on Lightning's closure (several `training_step` evaluations per step); "
        "ASGD validates with its averaged parameters. Same seed and data order for each, one epoch:"
    ),
    nbformat.v4.new_code_cell(
        "choices = {'nesterov': dict(lr=0.1), 'adamw': dict(lr=1e-2, weight_decay=1e-4),\n"
        "           'lbfgs': dict(lr=0.1, optimizer_kwargs={'max_iter': 3}),\n"
        "           'asgd': dict(lr=0.5, optimizer_kwargs={'t0': 10})}\n"
        "rows = []\n"
        "for name, kwargs in choices.items():\n"
        "    L.seed_everything(0, verbose=False)\n"
        "    module = DeepMLP(depth=3, width=64)\n"
        "    t = trainer(max_epochs=1, callbacks=[OptimizerCallback(name, **kwargs)])\n"
        "    t.fit(module, datamodule=dm)\n"
        "    rows.append((name, type(t.optimizers[0]).__name__, float(t.callback_metrics['val_acc'])))\n"
        "print(f\"{'name':10s} {'optimizer':18s} val_acc after 1 epoch\")\n"
        "for name, cls, acc in rows:\n"
        "    print(f'{name:10s} {cls:18s} {acc:.3f}')"
    ),
    nbformat.v4.new_markdown_cell(
        "## The LR a run really used\n\n"
        "`LRSchedule` wraps whatever optimizer results (here the `OptimizerCallback`'s AdamW, listed *after* it in "
        "`callbacks`). Under `accumulate_grad_batches=2` it steps once per optimizer step and its length is the "
        "number of optimizer steps, so the curve ends exactly at the floor:"
    ),
    nbformat.v4.new_code_cell(
        "runs = {}\n"
        "for schedule, kw in {'cosine': dict(warmup_fraction=0.1, min_lr_ratio=0.05), 'one_cycle': {}}.items():\n"
        "    L.seed_everything(0, verbose=False)\n"
        "    recorder = LRRecorder()\n"
        "    sched = LRSchedule(schedule, **kw)\n"
        "    t = trainer(max_epochs=2, limit_train_batches=12, accumulate_grad_batches=2,\n"
        "                callbacks=[sched, OptimizerCallback('adamw', lr=1e-2, weight_decay=1e-4), recorder])\n"
        "    t.fit(DeepMLP(depth=3, width=64), datamodule=dm)\n"
        "    runs[schedule] = (recorder.lrs, sched, float(t.callback_metrics['val_acc']))\n"
        "fig, ax = plt.subplots(figsize=(7, 3))\n"
        "for schedule, (lrs, sched, acc) in runs.items():\n"
        "    ax.plot(lrs, label=f'{schedule}: {len(lrs)} optimizer steps, val_acc {acc:.3f}')\n"
        "    expected = [1e-2 * sched.factor(s) for s in range(len(lrs))]\n"
        "    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12\n"
        "ax.set_xlabel('optimizer step'); ax.set_ylabel('LR used'); ax.legend(fontsize=8)\n"
        "plt.tight_layout(); plt.show()\n"
        "print('total optimizer steps resolved by LRSchedule:', {k: v[1].resolved_total_steps for k, v in runs.items()})"
    ),
    nbformat.v4.new_markdown_cell(
        "## ReduceLROnPlateau on `val_loss`\n\n"
        "With a deliberately large LR (0.5) training becomes unstable; once `val_loss` has gone more than "
        "`patience` epochs without improving on its best, the LR is halved (the LR of every group is also logged "
        "as `lr-<group>` each step):"
    ),
    nbformat.v4.new_code_cell(
        "L.seed_everything(0, verbose=False)\n"
        "epoch_lr, val_loss = [], []\n"
        "class Watch(L.Callback):\n"
        "    def on_train_epoch_start(self, trainer, module): epoch_lr.append(trainer.optimizers[0].param_groups[0]['lr'])\n"
        "    def on_validation_epoch_end(self, trainer, module): val_loss.append(float(trainer.callback_metrics['val_loss']))\n"
        "t = trainer(max_epochs=8, limit_train_batches=5, limit_val_batches=1,\n"
        "            callbacks=[ReduceLROnPlateau('val_loss', patience=1, factor=0.5), Watch()])\n"
        "t.fit(DeepMLP(depth=3, width=64, lr=0.5), datamodule=dm)\n"
        "for epoch, (lr, loss) in enumerate(zip(epoch_lr, val_loss)):\n"
        "    print(f'epoch {epoch}: lr {lr:.4f}  val_loss {loss:.4f}')"
    ),
]

if __name__ == "__main__":
    from _cells_02_stability import cells as stability_cells  # part 2, kept in its own file

    notebook = nbformat.v4.new_notebook(
        cells=cells + stability_cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}}
    )
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": tempfile.mkdtemp()}}).execute()
    path = Path(__file__).with_name("02_optimization.ipynb")
    nbformat.write(notebook, path)
    print("wrote", path)
