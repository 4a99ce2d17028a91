"""Builds notebooks/02_optimization.ipynb (optimization): ``python notebooks/_build_02_optimization.py`` from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "02_optimization.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Optimizers and learning-rate schedules without touching the module

`OptimizerCallback` gives a stock `LightningModule` any of 14 optimizers by name (biases and norm weights excluded from weight decay), `LRSchedule` adds warm-up + decay / one-cycle / warm restarts stepped per optimizer step, and `ReduceLROnPlateau` reduces the LR on a plateau of a logged metric, agreed across DDP ranks. The module's `configure_optimizers` is never edited; the callbacks compose in any order.

Data: scikit-learn's bundled 8x8 handwritten digits (no download)."""),
    ("code", """import logging, tempfile, warnings
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import lightning as L
import matplotlib.pyplot as plt
import torch

from lightning_techniques import LRSchedule, OptimizerCallback, ReduceLROnPlateau
from lightning_techniques.functional import lr_at
from lightning_techniques.demo import DeepMLP, DigitsDataModule

torch.set_num_threads(1)  # tiny models: one thread is fastest
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
root = tempfile.mkdtemp()
dm = DigitsDataModule(batch_size=64)

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)

class LRRecorder(L.Callback):
    def __init__(self): self.lrs = []
    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.lrs.append(optimizer.param_groups[0]['lr'])"""),
    ("md", """## The schedules: `lr_at(step, total, ...)`

The functional core gives the LR multiplier at each optimizer step (unit-tested against torch's own schedulers). Here over a run of 200 optimizer steps, 20 of them warm-up:"""),
    ("code", """total, steps = 200, range(200)
curves = {
    'cosine (warm-up 20, floor 0.05)': [lr_at(s, total, 'cosine', warmup_steps=20, min_ratio=0.05) for s in steps],
    'linear (warm-up 20)': [lr_at(s, total, 'linear', warmup_steps=20) for s in steps],
    'polynomial p=2': [lr_at(s, total, 'polynomial', warmup_steps=20, power=2.0) for s in steps],
    'step (every 50, x0.5)': [lr_at(s, total, 'step', warmup_steps=20, step_size=50, gamma=0.5) for s in steps],
    'exponential (x0.985)': [lr_at(s, total, 'exponential', warmup_steps=20, gamma=0.985) for s in steps],
    'one-cycle': [lr_at(s, total, 'one_cycle') for s in steps],
    'warm restarts (T0=30, x2)': [lr_at(s, total, 'cosine_restarts', cycle_steps=30, cycle_mult=2) for s in steps],
}
fig, ax = plt.subplots(figsize=(8.5, 3.2))
for name, values in curves.items():
    ax.plot(values, label=name)
ax.set_xlabel('optimizer step'); ax.set_ylabel('LR / base LR')
ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.0, 0.5))
plt.tight_layout(); plt.show()"""),
    ("md", """## Optimizers by name on an unmodified module

`DeepMLP`'s own `configure_optimizers` returns SGD; `OptimizerCallback` replaces it for the run (and puts it back afterwards). L-BFGS runs on Lightning's closure (several `training_step` evaluations per step); ASGD validates with its averaged parameters. Same seed and data order for each, one epoch:"""),
    ("code", """choices = {'nesterov': dict(lr=0.1), 'adamw': dict(lr=1e-2, weight_decay=1e-4),
           'lbfgs': dict(lr=0.1, optimizer_kwargs={'max_iter': 3}),
           'asgd': dict(lr=0.5, optimizer_kwargs={'t0': 10})}
rows = []
for name, kwargs in choices.items():
    L.seed_everything(0, verbose=False)
    module = DeepMLP(depth=3, width=64)
    t = trainer(max_epochs=1, callbacks=[OptimizerCallback(name, **kwargs)])
    t.fit(module, datamodule=dm)
    rows.append((name, type(t.optimizers[0]).__name__, float(t.callback_metrics['val_acc'])))
print(f"{'name':10s} {'optimizer':18s} val_acc after 1 epoch")
for name, cls, acc in rows:
    print(f'{name:10s} {cls:18s} {acc:.3f}')"""),
    ("md", """## The LR a run really used

`LRSchedule` wraps whatever optimizer results (here the `OptimizerCallback`'s AdamW, listed *after* it in `callbacks`). Under `accumulate_grad_batches=2` it steps once per optimizer step and its length is the number of optimizer steps, so the curve ends exactly at the floor:"""),
    ("code", """runs = {}
for schedule, kw in {'cosine': dict(warmup_fraction=0.1, min_lr_ratio=0.05), 'one_cycle': {}}.items():
    L.seed_everything(0, verbose=False)
    recorder = LRRecorder()
    sched = LRSchedule(schedule, **kw)
    t = trainer(max_epochs=2, limit_train_batches=12, accumulate_grad_batches=2,
                callbacks=[sched, OptimizerCallback('adamw', lr=1e-2, weight_decay=1e-4), recorder])
    t.fit(DeepMLP(depth=3, width=64), datamodule=dm)
    runs[schedule] = (recorder.lrs, sched, float(t.callback_metrics['val_acc']))
fig, ax = plt.subplots(figsize=(7, 3))
for schedule, (lrs, sched, acc) in runs.items():
    ax.plot(lrs, label=f'{schedule}: {len(lrs)} optimizer steps, val_acc {acc:.3f}')
    expected = [1e-2 * sched.factor(s) for s in range(len(lrs))]
    assert max(abs(a - b) for a, b in zip(lrs, expected)) < 1e-12
ax.set_xlabel('optimizer step'); ax.set_ylabel('LR used'); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()
print('total optimizer steps resolved by LRSchedule:', {k: v[1].resolved_total_steps for k, v in runs.items()})"""),
    ("md", """## ReduceLROnPlateau on `val_loss`

With a deliberately large LR (0.5) training becomes unstable; once `val_loss` has gone more than `patience` epochs without improving on its best, the LR is halved (the LR of every group is also logged as `lr-<group>` each step):"""),
    ("code", """L.seed_everything(0, verbose=False)
epoch_lr, val_loss = [], []
class Watch(L.Callback):
    def on_train_epoch_start(self, trainer, module): epoch_lr.append(trainer.optimizers[0].param_groups[0]['lr'])
    def on_validation_epoch_end(self, trainer, module): val_loss.append(float(trainer.callback_metrics['val_loss']))
t = trainer(max_epochs=8, limit_train_batches=5, limit_val_batches=1,
            callbacks=[ReduceLROnPlateau('val_loss', patience=1, factor=0.5), Watch()])
t.fit(DeepMLP(depth=3, width=64, lr=0.5), datamodule=dm)
for epoch, (lr, loss) in enumerate(zip(epoch_lr, val_loss)):
    print(f'epoch {epoch}: lr {lr:.4f}  val_loss {loss:.4f}')"""),
    ("md", """# Part 2: training stability and gradient accumulation

Four techniques that keep a run healthy, each attached to a stock `lightning.Trainer` with the demo's unmodified `DigitsCNN` on scikit-learn's digits:

1. **`NonFiniteGuard`** - a NaN batch skips the optimizer step instead of destroying the weights;
2. **`AdaptiveGradientClipping`** (Brock et al. 2021) and **`AutoClip`** (Seetharaman et al. 2020) - clipping statistics per step;
3. **`AccumulationScheduler`** - accumulation scheduled by optimizer step (batch-size warm-up), with the exact number of optimizer steps for LR schedules;
4. **`SmartMixedPrecision`** - the loss scale over time and the steps the GradScaler skipped."""),
    ("code", '''import logging, tempfile, warnings
import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import (AccumulationScheduler, AdaptiveGradientClipping, AutoClip, NonFiniteGuard,
                                  SmartMixedPrecision)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule

warnings.filterwarnings('ignore')
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
torch.set_num_threads(1)
root = tempfile.mkdtemp()

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=root, **kw)

class Poison(Callback):
    """Replaces the inputs of the given global batches with NaN (a corrupted record, an overflow ...)."""
    def __init__(self, batches): self.batches = set(batches)
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.fit_loop.total_batch_idx in self.batches:
            batch[0].fill_(float('nan'))

def accuracy(model, dm):
    dm.setup()
    x, y = dm.test_dataset.inputs, dm.test_dataset.targets
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())'''),
    ("md", """## 1. One NaN batch, with and without `NonFiniteGuard`

Batch 10 carries NaN inputs. Without the guard, Adam writes NaN into every weight and the run is lost; with it, that step is skipped (gradients dropped, weights and optimizer state untouched) and training goes on."""),
    ("code", """for name, poisoned, extra in [('clean run (no NaN)', set(), []), ('NaN batch, no guard', {10}, []),
                               ('NaN batch + NonFiniteGuard', {10}, [NonFiniteGuard(max_consecutive_skips=5)])]:
    L.seed_everything(0, verbose=False)
    model, dm = DigitsCNN(channels=16), DigitsDataModule()
    trainer(max_steps=80, callbacks=[Poison(poisoned)] + extra).fit(model, datamodule=dm)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    print(f'{name:27s} finite weights: {finite!s:5s}  test accuracy: {accuracy(model, dm):.3f}', end='')
    print(f'  skipped steps: {extra[0].skipped_steps}' if extra else '')"""),
    ("md", """## 2. Clipping beside no clipping: AGC and AutoClip

A learning rate too high for this CNN (Adam, lr 0.03) gives the clippers work; the same run without clipping runs beside them (same seed, same data order, 60 steps). AGC clips each unit's gradient to `clipping x ||W_unit||`; AutoClip clips the total norm at the 10th percentile of the norms seen so far. Both log `grad_norm_before` / `grad_norm_after` / `clip_fraction`; here a small callback collects them and the training loss. Left: the loss of the three runs; middle and right: the norms each clipper saw. The numbers under the figure compare the final loss and the test accuracy."""),
    ("code", """class Norms(Callback):
    def __init__(self, clipper=None): self.clipper, self.before, self.after, self.loss = clipper, [], [], []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss.append(float(outputs['loss']))
        if self.clipper is not None:
            self.before.append(self.clipper.last_norm_before); self.after.append(self.clipper.last_norm_after)

runs = {}
for name, clipper in [('no clipping', None),
                      ('AdaptiveGradientClipping', AdaptiveGradientClipping(clipping=0.05, exclude=['head.*'])),
                      ('AutoClip', AutoClip(percentile=10))]:
    L.seed_everything(0, verbose=False)
    norms = Norms(clipper)
    model, dm = DigitsCNN(channels=16, lr=0.03), DigitsDataModule()
    trainer(max_steps=60, callbacks=([clipper] if clipper else []) + [norms]).fit(model, datamodule=dm)
    runs[name] = (norms, accuracy(model, dm))

fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
for name, (norms, acc) in runs.items():
    axes[0].plot(norms.loss, label=f'{name} (test acc {acc:.2f})', lw=1)
axes[0].set_yscale('log'); axes[0].set_xlabel('optimizer step'); axes[0].set_ylabel('training loss'); axes[0].legend(fontsize=7)
for ax, name in zip(axes[1:], ['AdaptiveGradientClipping', 'AutoClip']):
    norms, _ = runs[name]
    ax.semilogy(norms.before, label='before'); ax.semilogy(norms.after, label='after')
    ax.set_title(f'{name}: clipped {norms.clipper.clip_fraction:.0%} of steps', fontsize=9)
    ax.set_xlabel('optimizer step'); ax.set_ylabel('total gradient norm'); ax.legend(fontsize=8)
plt.tight_layout(); plt.show()
for name, (norms, acc) in runs.items():
    print(f'{name:25s} mean loss of the last 10 steps {sum(norms.loss[-10:]) / 10:.3f}  test accuracy {acc:.3f}')"""),
    ("md", """## 3. Accumulation scheduled by step: a batch-size warm-up

`AccumulationScheduler(warmup_to=8, warmup_steps=30)` grows accumulation 1 -> 2 -> 4 -> 8 over the first 30 optimizer steps. A new factor starts only at a step boundary whose position in the epoch is a multiple of it, so no accumulation group is ever split. `plan(trainer)` is the exact schedule; `total_optimizer_steps(trainer)` is what an LR schedule's `total_steps=` needs, and `trainer.estimated_stepping_batches` read in `configure_optimizers` returns exactly that (Lightning's own estimate ignores any accumulation schedule)."""),
    ("code", """class Effective(Callback):
    def __init__(self): self.samples, self.batches, self.per_step, self.micro = 0, 0, [], []
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.samples += len(batch[1]); self.batches += 1
    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.per_step.append(self.samples); self.micro.append(self.batches); self.samples = self.batches = 0

class CNN(DigitsCNN):
    def configure_optimizers(self):  # what an OneCycleLR(total_steps=...) would be given
        self.estimated = self.trainer.estimated_stepping_batches
        return super().configure_optimizers()

L.seed_everything(0, verbose=False)
acc, eff, model = AccumulationScheduler(warmup_to=8, warmup_steps=30), Effective(), CNN(channels=16)
t = trainer(max_epochs=3, callbacks=[acc, eff])
t.fit(model, datamodule=DigitsDataModule(batch_size=32))
plan = acc.plan(t)
print('schedule:', acc.schedule)
print('switches:', acc.switches)
print('optimizer steps: planned', acc.total_optimizer_steps(t), ' done', t.global_step,
      ' estimated_stepping_batches inside configure_optimizers', model.estimated,
      " (Lightning's own estimate: 3 x 40 = 120 with k=1, 15 with k=8)")
assert [p.micro_batches for p in plan] == eff.micro  # micro-batches per step: exactly as planned
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.step(range(len(eff.per_step)), eff.per_step, where='post', label='measured')
ax.plot([32 * p.micro_batches for p in plan], '.', ms=3, label='plan (x 32; an epoch ends on a 9-sample batch)')
ax.set_xlabel('optimizer step'); ax.set_ylabel('samples per step'); ax.legend(fontsize=8); plt.tight_layout(); plt.show()"""),
    ("md", """## 4. Mixed precision: the loss scale and the skipped steps

`SmartMixedPrecision('auto')` picks bf16 where the hardware has it, fp16 with a GradScaler on older GPUs, else fp32. Here fp16 with the CPU GradScaler (so the scaler has something to show on a CPU machine): batches 15-17 carry NaN, the scaler skips those steps and halves the scale each time; `growth_interval=10` lets it grow back. The plugin records what callbacks cannot see."""),
    ("code", """L.seed_everything(0, verbose=False)
amp = SmartMixedPrecision('16-mixed', device='cpu', init_scale=2.0**12, growth_interval=10,
                          fp32_modules=['head'], max_consecutive_skips=10)
trainer(max_steps=45, plugins=[amp], callbacks=[Poison({15, 16, 17})]).fit(DigitsCNN(channels=16),
                                                                         datamodule=DigitsDataModule())
from lightning_techniques.optim.precision import best_precision
print("precision='auto' would choose here:", best_precision('cuda' if torch.cuda.is_available() else 'cpu'))
print('kept in fp32:', amp.kept_in_fp32, ' skipped steps:', amp.skipped_steps)
steps, scales = zip(*amp.scale_history)
fig, ax = plt.subplots(figsize=(6, 2.5))
ax.semilogy(steps, scales, label='loss scale')
ax.plot(amp.skipped_steps, [dict(amp.scale_history)[s] for s in amp.skipped_steps], 'rx', label='skipped step')
ax.set_xlabel('optimizer step'); ax.legend(fontsize=8); plt.tight_layout(); plt.show()"""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
