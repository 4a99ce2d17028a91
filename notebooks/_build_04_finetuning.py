"""Builds notebooks/04_finetuning.ipynb (parameter-efficient fine-tuning): ``python notebooks/_build_04_finetuning.py``
from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "04_finetuning.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Fine-tuning on a stock Trainer: LoRA, QLoRA and ReLoRA beside full fine-tuning

A two-stage task without downloads: the demo MLP is **pre-trained on digits 0-4**, then **fine-tuned on digits 5-9** (scikit-learn's bundled digits; `DigitsDataModule(classes=[...])` keeps the listed digits and numbers their labels 0-4). The new classes get a fresh head. Four ways to do the second stage, each a callback on a plain `lightning.Trainer` with the module unchanged:

* **full fine-tuning** - every weight trains (the baseline);
* **`LoRA`** (Hu et al. 2021) - the two hidden layers stay frozen and learn a rank-4 update `B A` (peft's LoRA layers);
* **`QLoRA`** (Dettmers et al. 2023) - the same, with the frozen base weights stored in 4-bit NF4 (bitsandbytes; on the CPU too);
* **`ReLoRA`** (Lialin et al. 2023) - LoRA whose factors are merged into the base weights and restarted every 50 steps, so the sum of low-rank updates can reach a higher rank.

In every method the fresh head trains fully (`train_also=['net.5']`). At the end, `AdaLoRA`, `Adapters`, `PromptTuning` and `PrefixTuning` go through the same interface."""),
    ("code", """import logging, tempfile, warnings
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import LoRA, QLoRA, ReLoRA
from lightning_techniques.demo import DeepMLP, DigitsDataModule

torch.set_num_threads(1)  # tiny models: one thread is fastest
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
root = tempfile.mkdtemp()

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **kw)

class Curves(Callback):
    \"\"\"Training loss per step, validation accuracy per epoch, and the parameters that reach the optimizer.\"\"\"
    def __init__(self): self.loss, self.val_acc, self.trainable = [], [], 0
    def on_train_start(self, trainer, module):
        self.trainable = sum(p.numel() for opt in trainer.optimizers for g in opt.param_groups for p in g['params'])
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss.append(float(outputs['loss']))
    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.val_acc.append((trainer.global_step, float(trainer.callback_metrics['val_acc'])))

def mlp(lr):
    return DeepMLP(depth=3, width=128, num_classes=5, optimizer='adam', lr=lr)"""),
    ("md", """## Stage 1: pre-train on digits 0-4

`DeepMLP(depth=3, width=128)` is `Flatten, Linear(64, 128), ReLU, Linear(128, 128), ReLU, Linear(128, 5)`: the hidden layers are `net.1` and `net.3`, the head `net.5`."""),
    ("code", """L.seed_everything(0, verbose=False)
first, second = DigitsDataModule(classes=[0, 1, 2, 3, 4]), DigitsDataModule(classes=[5, 6, 7, 8, 9])
pretrained = mlp(3e-3)
trainer(max_steps=300, limit_val_batches=0).fit(pretrained, datamodule=first)
(result,) = trainer().test(pretrained, datamodule=first, verbose=False)
weights = {k: v.clone() for k, v in pretrained.state_dict().items()}
print(f"digits 0-4, test accuracy after pre-training: {result['test_acc']:.3f}")"""),
    ("md", """## Stage 2: fine-tune on digits 5-9, four ways

Every run starts from a copy of the pre-trained weights with the **same fresh head** (re-initialised from one seed), the same data order and the module's own Adam; full fine-tuning at lr 3e-3, the adapters at 1e-2 (they start from zero and train few parameters). Only the callback differs."""),
    ("code", """TARGETS, HEAD = ['net.1', 'net.3'], ['net.5']
methods = {
    'full fine-tuning': (3e-3, lambda: []),
    'LoRA r=4': (1e-2, lambda: [LoRA(targets=TARGETS, rank=4, alpha=8, train_also=HEAD)]),
    'QLoRA r=4 (NF4)': (1e-2, lambda: [QLoRA(targets=TARGETS, rank=4, alpha=8, train_also=HEAD)]),
    'ReLoRA r=4': (1e-2, lambda: [ReLoRA(targets=TARGETS, r=4, alpha=8, restart_every=50, rewarm_steps=5,
                                        train_also=HEAD)]),
}

def start():
    model = mlp(3e-3)
    model.load_state_dict(weights)
    torch.manual_seed(1000)
    model.net[5].reset_parameters()  # the fresh head for the new classes, the same in every run
    return model

runs = {}
for name, (lr, callbacks) in methods.items():
    L.seed_everything(0, verbose=False)
    model = start()
    model.lr = lr
    curves = Curves()
    trainer(max_steps=150, callbacks=callbacks() + [curves]).fit(model, datamodule=second)
    (result,) = trainer().test(model, datamodule=second, verbose=False)
    runs[name] = dict(model=model, curves=curves, test_acc=result['test_acc'])
    print(f"{name:>18}: {curves.trainable:6,} trainable parameters, test accuracy {result['test_acc']:.3f}")"""),
    ("md", """## Curves and trainable parameters side by side"""),
    ("code", """total = sum(p.numel() for p in pretrained.parameters())
fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 3.6))
for name, run in runs.items():
    loss = torch.tensor(run['curves'].loss)
    smooth = torch.nn.functional.avg_pool1d(loss[None, None], 10, 1).flatten()
    ax1.plot(range(9, len(loss)), smooth, label=name)
    steps, acc = zip(*run['curves'].val_acc)
    ax2.plot(steps, acc, marker='.', label=name)
ax1.set(xlabel='step', ylabel='training loss (mean of 10)', title='digits 5-9: training loss', yscale='log')
ax2.set(xlabel='step', ylabel='validation accuracy', title='digits 5-9: validation accuracy', ylim=(0.5, 1.0))
ax2.legend(loc='lower right')
names = list(runs)
counts = [runs[n]['curves'].trainable for n in names]
bars = ax3.barh(names, counts, color=[f'C{i}' for i in range(len(names))])
ax3.bar_label(bars, [f'{c:,} ({100 * c / total:.0f} %)' for c in counts], padding=3)
ax3.set(xscale='log', xlabel='parameters reaching the optimizer', title=f'trainable of {total:,}', xlim=(100, 3e5))
ax3.invert_yaxis()
plt.tight_layout(); plt.show()"""),
    ("md", """The three adapter methods train a tenth of the parameters (645 of them the fresh head's) and end within about two points of full fine-tuning's test accuracy; QLoRA follows LoRA closely although its frozen base weights are 4-bit.

## What QLoRA stores

After `fit` the module keeps its adapted layers (the declared change, `changed_paths`). QLoRA's base weights are bitsandbytes `Params4bit`: two NF4 values per byte plus one scale (`absmax`) per block of 64 weights."""),
    ("code", """def stored_bytes(weight):
    n = weight.numel() * weight.element_size()
    state = getattr(weight, 'quant_state', None)
    while state is not None:  # absmax (and with double quantisation the nested state), the NF4 code book
        n += sum(t.numel() * t.element_size() for t in (state.absmax, state.code) if torch.is_tensor(t))
        state = getattr(state, 'state2', None)
    return n

for name in ['LoRA r=4', 'QLoRA r=4 (NF4)']:
    model = runs[name]['model']
    for path in TARGETS:
        base = model.get_submodule(path).get_base_layer()
        fp32 = 4 * base.in_features * base.out_features
        print(f"{name:>16} {path}: {type(base).__name__:>10} {base.weight.dtype}, base weight "
              f"{stored_bytes(base.weight):6,} bytes ({stored_bytes(base.weight) / fp32:.2f} of fp32)")"""),
    ("md", """## ReLoRA: low-rank steps, higher-rank sum

Each layer's *effective* weight is read from the layer itself (its output for the identity matrix minus its output for zero: base weight plus adapter update, 4-bit weights dequantised), and compared with the pre-trained weight. LoRA's update has rank 4 at most; ReLoRA merged two restarts into the base weights and so adds up to three rank-4 updates."""),
    ("code", """@torch.no_grad()
def effective_weight(layer, n_in):
    layer.eval()
    eye = torch.eye(n_in)
    return (layer(eye) - layer(torch.zeros(1, n_in))).T

fig, ax = plt.subplots(figsize=(6, 3.4))
for name, run in runs.items():
    layer = run['model'].net[3]
    delta = effective_weight(layer, 128) - weights['net.3.weight']
    sv = torch.linalg.svdvals(delta)
    rank = int((sv > 1e-3 * sv[0]).sum())
    ax.semilogy(sv[:20].numpy(), marker='.', label=f'{name} (numerical rank {rank})')
ax.set(xlabel='singular value index', ylabel='singular value of the update', title='net.3: fine-tuned minus pre-trained weight')
ax.legend(fontsize=8); plt.show()"""),
    ("md", """Full fine-tuning changes the weight in every direction; LoRA's update stops at rank 4; ReLoRA, with the same rank-4 factors, reaches rank 12 after two restarts (QLoRA's update also shows the small, full-rank difference between the 4-bit and the fp32 weight).

## The other methods, through the same interface

`AdaLoRA` (Zhang et al. 2023) starts at rank 8 and prunes to an average rank 4 by importance; `Adapters` (Houlsby et al. 2019) add a small bottleneck MLP after each hidden layer. Same start, same head, same data order."""),
    ("code", """from lightning_techniques import AdaLoRA, Adapters

others = {
    'AdaLoRA r 8->4': lambda: AdaLoRA(targets=TARGETS, init_r=8, target_r=4, alpha=8, tinit=15, tfinal=30, delta_t=5,
                                      total_steps=150, train_also=HEAD, log=False),
    'Adapters b=8': lambda: Adapters(targets=TARGETS, bottleneck=8, train_also=HEAD),
}
for name, make in others.items():
    L.seed_everything(0, verbose=False)
    model = start()
    model.lr = 1e-2
    curves = Curves()
    callback = make()
    trainer(max_steps=150, limit_val_batches=0, callbacks=[callback, curves]).fit(model, datamodule=second)
    (result,) = trainer().test(model, datamodule=second, verbose=False)
    print(f"{name:>18}: {curves.trainable:6,} trainable parameters, test accuracy {result['test_acc']:.3f}, "
          f"changed: {list(callback.changed_paths)}")"""),
    ("md", """## Prompt and prefix tuning on a token-sequence model

Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) need a sequence model. The demo `TinyTransformer` reads a digit as 8 tokens (its rows); on such a plain module `PromptTuning(at='blocks.0')` prepends learnable tokens to the first block's input and `PrefixTuning(at=[...])` gives every block its own learnable prefix activations (on a Hugging Face model both go through peft instead). Pre-trained on digits 0-4, then tuned on 5-9 with only the prompt and the fresh head training."""),
    ("code", """from lightning_techniques import PrefixTuning, PromptTuning
from lightning_techniques.demo import TinyTransformer

L.seed_everything(0, verbose=False)
pretrained_t = TinyTransformer(num_classes=5)
trainer(max_steps=200, limit_val_batches=0).fit(pretrained_t, datamodule=first)
weights_t = {k: v.clone() for k, v in pretrained_t.state_dict().items()}

seq_runs = {}
for name, lr, make in [
        ('full fine-tuning', 3e-3, lambda: []),
        ('PromptTuning 4 tokens', 1e-2, lambda: [PromptTuning(num_tokens=4, at='blocks.0', train_also=['head'])]),
        ('PrefixTuning 4 tokens', 1e-2, lambda: [PrefixTuning(num_tokens=4, at=['blocks.0', 'blocks.1'],
                                                              train_also=['head'])])]:
    L.seed_everything(0, verbose=False)
    model = TinyTransformer(num_classes=5, lr=lr)
    model.load_state_dict(weights_t)
    torch.manual_seed(1000)
    model.head.reset_parameters()
    curves = Curves()
    trainer(max_steps=150, callbacks=make() + [curves]).fit(model, datamodule=second)
    seq_runs[name] = curves

fig, ax = plt.subplots(figsize=(6, 3.2))
for name, curves in seq_runs.items():
    steps, acc = zip(*curves.val_acc)
    ax.plot(steps, acc, marker='.', label=f'{name} ({curves.trainable:,} trainable)')
ax.set(xlabel='step', ylabel='validation accuracy', title='TinyTransformer, digits 5-9', ylim=(0.3, 1.0))
ax.legend(fontsize=8, loc='lower right'); plt.show()"""),
    ("md", """With a few hundred trainable parameters - the prompt (or prefix) and the fresh head, the transformer itself frozen - both climb to 0.8-0.9 validation accuracy in 150 steps, below full fine-tuning.

`benchmarks/finetune.py` runs all of these over several seeds with memory in bytes and step times, and adds a tiny BERT built from a config (no download) pre-trained on one synthetic sequence task and adapted to another; the table is in `benchmarks/RESULTS.md`."""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
