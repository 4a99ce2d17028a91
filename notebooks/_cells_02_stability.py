"""Cells of notebooks/02_optimization.ipynb, part 2 (stability and accumulation); `_build_02.py` builds it."""

import nbformat

md = nbformat.v4.new_markdown_cell
code = nbformat.v4.new_code_cell

cells = [
    md(
        "# Part 2: training stability and gradient accumulation\n\n"
        "Four techniques that keep a run healthy, each attached to a stock `lightning.Trainer` with the demo's "
        "unmodified `DigitsCNN` on scikit-learn's digits:\n\n"
        "1. **`NonFiniteGuard`** - a NaN batch skips the optimizer step instead of destroying the weights;\n"
        "2. **`AdaptiveGradientClipping`** (Brock et al. 2021) and **`AutoClip`** (Seetharaman et al. 2020) - clipping "
        "statistics per step;\n"
        "3. **`AccumulationScheduler`** - accumulation scheduled by optimizer step (batch-size warm-up), with the exact "
        "number of optimizer steps for LR schedules;\n"
        "4. **`SmartMixedPrecision`** - the loss scale over time and the steps the GradScaler skipped."
    ),
    code(
        "import logging, tempfile, warnings\n"
        "import lightning as L\n"
        "import matplotlib.pyplot as plt\n"
        "import torch\n"
        "from lightning.pytorch.callbacks import Callback\n\n"
        "from lightning_techniques import (AccumulationScheduler, AdaptiveGradientClipping, AutoClip, NonFiniteGuard,\n"
        "                                  SmartMixedPrecision)\n"
        "from lightning_techniques.demo import DigitsCNN, DigitsDataModule\n\n"
        "warnings.filterwarnings('ignore')\n"
        "logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)\n"
        "torch.set_num_threads(1)\n"
        "root = tempfile.mkdtemp()\n\n"
        "def trainer(**kw):\n"
        "    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
        "                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,\n"
        "                     default_root_dir=root, **kw)\n\n"
        "class Poison(Callback):\n"
        "    \"\"\"Replaces the inputs of the given global batches with NaN (a corrupted record, an overflow ...).\"\"\"\n"
        "    def __init__(self, batches): self.batches = set(batches)\n"
        "    def on_train_batch_start(self, trainer, module, batch, batch_idx):\n"
        "        if trainer.fit_loop.total_batch_idx in self.batches:\n"
        "            batch[0].fill_(float('nan'))\n\n"
        "def accuracy(model, dm):\n"
        "    dm.setup()\n"
        "    x, y = dm.test_dataset.inputs, dm.test_dataset.targets\n"
        "    with torch.no_grad():\n"
        "        return float((model(x).argmax(1) == y).float().mean())"
    ),
    md(
        "## 1. One NaN batch, with and without `NonFiniteGuard`\n\n"
        "Batch 10 carries NaN inputs. Without the guard, Adam writes NaN into every weight and the run is lost; "
        "with it, that step is skipped (gradients dropped, weights and optimizer state untouched) and training goes on."
    ),
    code(
        "for name, extra in [('no guard', []), ('NonFiniteGuard', [NonFiniteGuard(max_consecutive_skips=5)])]:\n"
        "    L.seed_everything(0, verbose=False)\n"
        "    model, dm = DigitsCNN(channels=16), DigitsDataModule()\n"
        "    trainer(max_steps=50, callbacks=[Poison({10})] + extra).fit(model, datamodule=dm)\n"
        "    finite = all(torch.isfinite(p).all() for p in model.parameters())\n"
        "    print(f'{name:15s} finite weights: {finite!s:5s}  test accuracy: {accuracy(model, dm):.3f}', end='')\n"
        "    print(f'  skipped steps: {extra[0].skipped_steps}' if extra else '')"
    ),
    md(
        "## 2. Clipping statistics: AGC and AutoClip\n\n"
        "A high learning rate (SGD, lr 0.3) to give the clippers work. AGC clips each unit's gradient to "
        "`clipping x ||W_unit||`; AutoClip clips the total norm at the 10th percentile of the norms seen so far. "
        "Both log `grad_norm_before` / `grad_norm_after` / `clip_fraction`; here a small callback collects them."
    ),
    code(
        "class Norms(Callback):\n"
        "    def __init__(self, clipper): self.clipper, self.before, self.after = clipper, [], []\n"
        "    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):\n"
        "        self.before.append(self.clipper.last_norm_before); self.after.append(self.clipper.last_norm_after)\n\n"
        "fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), sharey=True)\n"
        "for ax, clipper in zip(axes, [AdaptiveGradientClipping(clipping=0.05, exclude=['head.*']), AutoClip(percentile=10)]):\n"
        "    L.seed_everything(0, verbose=False)\n"
        "    norms = Norms(clipper)\n"
        "    model, dm = DigitsCNN(channels=16, lr=0.3, optimizer='sgd'), DigitsDataModule()\n"
        "    trainer(max_steps=40, callbacks=[clipper, norms]).fit(model, datamodule=dm)\n"
        "    ax.semilogy(norms.before, label='before'); ax.semilogy(norms.after, label='after')\n"
        "    ax.set_title(f'{type(clipper).__name__}: clipped {clipper.clip_fraction:.0%} of steps', fontsize=9)\n"
        "    ax.set_xlabel('optimizer step'); ax.legend(fontsize=8)\n"
        "    print(f'{type(clipper).__name__:25s} steps clipped: {clipper.clipped_steps}/{clipper.steps}'\n"
        "          f'  median norm before {sorted(norms.before)[len(norms.before) // 2]:.3f}'\n"
        "          f'  after {sorted(norms.after)[len(norms.after) // 2]:.3f}')\n"
        "axes[0].set_ylabel('total gradient norm'); plt.tight_layout(); plt.show()"
    ),
    md(
        "## 3. Accumulation scheduled by step: a batch-size warm-up\n\n"
        "`AccumulationScheduler(warmup_to=8, warmup_steps=30)` grows accumulation 1 -> 2 -> 4 -> 8 over the first 30 "
        "optimizer steps. A new factor starts only at a step boundary whose position in the epoch is a multiple of it, "
        "so no accumulation group is ever split. `plan(trainer)` is the exact schedule; "
        "`total_optimizer_steps(trainer)` is what an LR schedule's `total_steps=` needs, and "
        "`trainer.estimated_stepping_batches` read in `configure_optimizers` returns exactly that (Lightning's own "
        "estimate ignores any accumulation schedule)."
    ),
    code(
        "class Effective(Callback):\n"
        "    def __init__(self): self.samples, self.batches, self.per_step, self.micro = 0, 0, [], []\n"
        "    def on_train_batch_start(self, trainer, module, batch, batch_idx):\n"
        "        self.samples += len(batch[1]); self.batches += 1\n"
        "    def on_before_optimizer_step(self, trainer, module, optimizer):\n"
        "        self.per_step.append(self.samples); self.micro.append(self.batches); self.samples = self.batches = 0\n\n"
        "class CNN(DigitsCNN):\n"
        "    def configure_optimizers(self):  # what an OneCycleLR(total_steps=...) would be given\n"
        "        self.estimated = self.trainer.estimated_stepping_batches\n"
        "        return super().configure_optimizers()\n\n"
        "L.seed_everything(0, verbose=False)\n"
        "acc, eff, model = AccumulationScheduler(warmup_to=8, warmup_steps=30), Effective(), CNN(channels=16)\n"
        "t = trainer(max_epochs=3, callbacks=[acc, eff])\n"
        "t.fit(model, datamodule=DigitsDataModule(batch_size=32))\n"
        "plan = acc.plan(t)\n"
        "print('schedule:', acc.schedule)\n"
        "print('switches:', acc.switches)\n"
        "print('optimizer steps: planned', acc.total_optimizer_steps(t), ' done', t.global_step,\n"
        "      ' estimated_stepping_batches inside configure_optimizers', model.estimated,\n"
        "      \" (Lightning's own estimate: 3 x 40 = 120 with k=1, 15 with k=8)\")\n"
        "assert [p.micro_batches for p in plan] == eff.micro  # micro-batches per step: exactly as planned\n"
        "fig, ax = plt.subplots(figsize=(6, 2.5))\n"
        "ax.step(range(len(eff.per_step)), eff.per_step, where='post', label='measured')\n"
        "ax.plot([32 * p.micro_batches for p in plan], '.', ms=3, label='plan (x 32; an epoch ends on a 9-sample batch)')\n"
        "ax.set_xlabel('optimizer step'); ax.set_ylabel('samples per step'); ax.legend(fontsize=8); plt.tight_layout(); plt.show()"
    ),
    md(
        "## 4. Mixed precision: the loss scale and the skipped steps\n\n"
        "`SmartMixedPrecision('auto')` picks bf16 where the hardware has it, fp16 with a GradScaler on older GPUs, "
        "else fp32. Here fp16 with the CPU GradScaler (so the scaler has something to show on a CPU machine): "
        "batches 15-17 carry NaN, the scaler skips those steps and halves the scale each time; "
        "`growth_interval=10` lets it grow back. The plugin records what callbacks cannot see."
    ),
    code(
        "L.seed_everything(0, verbose=False)\n"
        "amp = SmartMixedPrecision('16-mixed', device='cpu', init_scale=2.0**12, growth_interval=10,\n"
        "                          fp32_modules=['head'], max_consecutive_skips=10)\n"
        "trainer(max_steps=45, plugins=[amp], callbacks=[Poison({15, 16, 17})]).fit(DigitsCNN(channels=16),\n"
        "                                                                         datamodule=DigitsDataModule())\n"
        "from lightning_techniques.optim.precision import best_precision\n"
        "print(\"precision='auto' would choose here:\", best_precision('cuda' if torch.cuda.is_available() else 'cpu'))\n"
        "print('kept in fp32:', amp.kept_in_fp32, ' skipped steps:', amp.skipped_steps)\n"
        "steps, scales = zip(*amp.scale_history)\n"
        "fig, ax = plt.subplots(figsize=(6, 2.5))\n"
        "ax.semilogy(steps, scales, label='loss scale')\n"
        "ax.plot(amp.skipped_steps, [dict(amp.scale_history)[s] for s in amp.skipped_steps], 'rx', label='skipped step')\n"
        "ax.set_xlabel('optimizer step'); ax.legend(fontsize=8); plt.tight_layout(); plt.show()"
    ),
]

