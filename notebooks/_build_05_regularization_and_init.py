"""Builds notebooks/05_regularization_and_init.ipynb (regularisation and initialisation):
``python notebooks/_build_05_regularization_and_init.py`` from the repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "05_regularization_and_init.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Regularisation and initialisation, each beside its baseline

Every technique here is a callback on a stock `lightning.Trainer`; the demo modules are not edited. Each section runs the technique and its baseline with the same seed, data order and optimizer:

1. **Initialisation**: `WeightInit` (Xavier/Glorot, He/Kaiming, ...) and `LSUVInit` vs. PyTorch's default on a 20-layer plain MLP: weight and activation statistics per layer, then the training loss;
2. **`L1Penalty`** (and `L2Penalty`) vs. no penalty: the histogram of the weights;
3. **`DropoutSchedule`**: the dropout rate over training (linear warm-up, curriculum dropout);
4. **`MCDropout`**: predictive uncertainty on correct vs. wrong test predictions, beside the single deterministic pass;
5. **`WeightNoise`**, **`ActivationNoise`**, **`ActivationDropout`**: training with noisy weights / activations, the model after `fit` clean;
6. **`LabelSmoothing`**: the confidence of the predictions;
7. **`AdversarialTraining`** (PGD) and **`VirtualAdversarialTraining`**: accuracy under a PGD attack beside standard training;
8. **`PreciseBN`** and **`NormSwap`**: BatchNorm trained with batches of two.

Data: scikit-learn's bundled 8x8 handwritten digits (no download). The multi-seed comparisons are in `benchmarks/RESULTS.md` (`python -m benchmarks.init_schemes`, `python -m benchmarks.l1_sparsity`)."""),
    ("code", """import logging, tempfile, warnings
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import lightning as L
import matplotlib.pyplot as plt
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques import (ActivationDropout, ActivationNoise, AdversarialTraining, DropoutSchedule, L1Penalty,
                                  L2Penalty, LabelSmoothing, LSUVInit, MCDropout, VirtualAdversarialTraining, WeightInit,
                                  WeightNoise)
from lightning_techniques.functional import init_weights, lsuv_init, mc_dropout_predict, pgd, scheduled_dropout
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule

torch.set_num_threads(1)  # tiny models: one thread is fastest
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
logging.getLogger('lightning_techniques').setLevel(logging.ERROR)
root = tempfile.mkdtemp()

def trainer(**kw):
    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=root, **kw)

class Losses(Callback):
    def __init__(self): self.values = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs['loss']))

dm = DigitsDataModule()
dm.setup('fit'); dm.setup('test')
x_batch = next(iter(dm.train_dataloader()))[0]
x_test = torch.stack([x for x, _ in dm.test_dataset]); y_test = torch.stack([y for _, y in dm.test_dataset])
len(dm.train_dataset), len(x_test)"""),
    ("md", """## 1. Initialisation: what each scheme does to the signal of a 20-layer MLP

`init_weights` is `WeightInit`'s functional core and `lsuv_init` `LSUVInit`'s. Left: the standard deviation of each layer's weight beside its formula (He normal: `sqrt(2 / fan_in)`; Xavier: `sqrt(2 / (fan_in + fan_out))`; PyTorch's default `nn.Linear` init: `sqrt(1 / (3 fan_in))`). Right: the standard deviation of each ReLU's output on one batch of digits. Under Xavier the signal shrinks layer after layer (a ReLU halves the variance, which Xavier's gain 1 does not compensate); PyTorch's default weights are smaller still, and its activations settle at a low level held up by the default's random biases (`U(±1/sqrt(fan_in))`; `WeightInit` sets biases to 0) - this network does not train (next cell). He keeps the signal roughly constant and LSUV sets every layer's output variance to 1 on the data."""),
    ("code", """def activation_stds(model, x):
    stds, h = [], x
    for layer in model.net:
        h = layer(h)
        if isinstance(layer, torch.nn.ReLU):
            stds.append(float(h.std()))
    return stds

schemes = {}
for name in ['default', 'xavier_normal', 'kaiming_normal', 'LSUV']:
    torch.manual_seed(0)
    model = DeepMLP(depth=20)
    if name == 'LSUV':
        lsuv_init(model, x_batch)
    elif name != 'default':
        init_weights(model, name, generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        schemes[name] = ([float(m.weight.std()) for m in linears], activation_stds(model, x_batch))

fan_in = np.array([m.in_features for m in linears]); fan_out = np.array([m.out_features for m in linears])
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.2))
for (name, (w, act)), colour in zip(schemes.items(), ['grey', 'tab:blue', 'tab:orange', 'tab:green']):
    a.plot(w, 'o', ms=3, c=colour, label=name); b.plot(act, 'o-', ms=3, c=colour, label=name)
a.plot(np.sqrt(2 / fan_in), '-', c='tab:orange', lw=1, label='He formula')
a.plot(np.sqrt(2 / (fan_in + fan_out)), '-', c='tab:blue', lw=1, label='Xavier formula')
a.plot(np.sqrt(1 / (3 * fan_in)), '-', c='grey', lw=1, label='default formula')
a.set_xlabel('linear layer'); a.set_ylabel('weight std'); a.legend(fontsize=7)
b.set_yscale('log'); b.set_xlabel('ReLU'); b.set_ylabel('activation std (one batch)'); b.legend(fontsize=7)
plt.tight_layout(); plt.show()
{name: f'{act[-1]:.2g}' for name, (w, act) in schemes.items()}  # std after the last ReLU"""),
    ("md", """### The training loss with each scheme as a callback

Same seed, same data order, the demo's SGD (momentum 0.9, lr 0.01); the only difference is the callback. `WeightInit` runs once at fit start (never on resume), `LSUVInit` on the first training batch."""),
    ("code", """curves = {}
for name, extra in [('default', []), ('WeightInit("xavier_normal")', [WeightInit('xavier_normal')]),
                    ('WeightInit("kaiming_normal")', [WeightInit('kaiming_normal')]), ('LSUVInit()', [LSUVInit()])]:
    L.seed_everything(0, verbose=False)
    losses = Losses()
    trainer(max_steps=150, callbacks=extra + [losses]).fit(DeepMLP(depth=20), datamodule=DigitsDataModule())
    curves[name] = losses.values

fig, ax = plt.subplots(figsize=(6.5, 3))
for (name, values), colour in zip(curves.items(), ['grey', 'tab:blue', 'tab:orange', 'tab:green']):
    ax.plot(values, c=colour, label=name)
ax.axhline(np.log(10), ls=':', c='k', lw=1, label='chance (ln 10)')
ax.set_xlabel('step'); ax.set_ylabel('training loss'); ax.set_title('20-layer plain MLP on digits'); ax.legend(fontsize=7)
plt.show()
{name: round(float(np.mean(v[-10:])), 3) for name, v in curves.items()}"""),
    ("md", """## 2. L1 sparsity beside no penalty (and L2)

`L1Penalty(λ)` adds `λ Σ|w|` over the conv/linear weights (not biases) to the loss the module's `training_step` returns; `L2Penalty` adds `λ Σw²`. The histogram of `log10 |w|` after the same 300 steps of the demo's Adam (lr 1e-2): L1 piles the weights up near zero (with Adam they hover within about one step size of it rather than landing exactly on it). An L2 term in the loss is, under Adam, rescaled per weight (it is not weight decay: for that use `OptimizerCallback("adamw", weight_decay=...)`), so it too moves the weights with little data gradient towards zero - here most of them below 1e-6 (the leftmost bar collects everything below 1e-6), at a larger cost in accuracy. Over three seeds and four coefficients see `benchmarks/RESULTS.md` (L1 sparsity)."""),
    ("code", """def fit_cnn(extra, steps=300, seed=0, **model_kw):
    L.seed_everything(seed, verbose=False)
    model = DigitsCNN(channels=16, lr=1e-2, **model_kw)
    losses = Losses()
    trainer(max_steps=steps, callbacks=extra + [losses]).fit(model, datamodule=DigitsDataModule())
    return model.eval(), losses.values

@torch.no_grad()
def accuracy(model):
    return float((model(x_test).argmax(1) == y_test).float().mean())

def cnn_weights(model):
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith('weight')])

baseline, baseline_losses = fit_cnn([])
penalised = {'no penalty': baseline, 'L1Penalty(3e-5)': fit_cnn([L1Penalty(3e-5)])[0],
             'L2Penalty(3e-4)': fit_cnn([L2Penalty(3e-4)])[0]}

fig, ax = plt.subplots(figsize=(6.5, 3))
bins = np.linspace(-6, 0.5, 60)
for (name, model), colour in zip(penalised.items(), ['grey', 'tab:red', 'tab:blue']):
    ax.hist(np.log10(cnn_weights(model).abs().clamp_min(1e-6).numpy()), bins=bins, histtype='step', lw=1.5,
            color=colour, label=name)
ax.axvline(-2, ls=':', c='k', lw=1)
ax.set_xlabel('log10 |w|  (conv and linear weights)'); ax.set_ylabel('weights'); ax.legend(fontsize=8); plt.show()
for name, model in penalised.items():
    w = cnn_weights(model)
    print(f'{name:16s} |w| < 1e-2: {float((w.abs() < 1e-2).float().mean()):6.1%}   test acc {accuracy(model):.3f}')"""),
    ("md", """## 3. Dropout schedules

`DropoutSchedule` sets the rate `p` of the model's dropout layers before every training batch from the optimizer step: `"linear"` warms up from `start` to the target, `"curriculum"` (Morerio et al. 2017) approaches it exponentially - little dropout while the network learns the easy features, more later. Without it the rate is the layer's own `p` from the first step. The curves are `scheduled_dropout` (the functional core); the dots are the rate the CNN's dropout layer really had during a run with `DropoutSchedule(steps=150, schedule="curriculum")`, and it is back at its own `p` after `fit`."""),
    ("code", """class RateRecorder(Callback):
    def __init__(self): self.p = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.p.append(module.dropout.p)

recorder = RateRecorder()
dropout_model, _ = fit_cnn([DropoutSchedule(steps=150, schedule='curriculum', log=False), recorder],
                           steps=300, dropout=0.5)
steps = np.arange(300)
fig, ax = plt.subplots(figsize=(6.5, 3))
ax.axhline(0.5, c='grey', label="no schedule: the layer's own p = 0.5")
ax.plot(steps, [scheduled_dropout(s, 0.5, 150, schedule='linear') for s in steps], c='tab:blue', label='linear, steps=150')
ax.plot(steps, [scheduled_dropout(s, 0.5, 150, schedule='curriculum') for s in steps], c='tab:orange',
        label='curriculum, steps=150')
ax.plot(steps[::10], recorder.p[::10], 'o', ms=3, c='tab:orange', label='p in the run')
ax.set_xlabel('optimizer step'); ax.set_ylabel('dropout p'); ax.legend(fontsize=7); plt.show()
print('after fit: dropout p =', dropout_model.dropout.p)"""),
    ("md", """## 4. Monte-Carlo dropout: uncertainty where the model is wrong

`MCDropout` runs `K` extra forward passes of each test batch with only the dropout layers active and logs the mean prediction's accuracy and NLL and the predictive entropy / mutual information; the user's `test_step` still logs the single deterministic pass beside it. Per sample (with `mc_dropout_predict`, its functional core): the predictive entropy of the right and the wrong predictions, beside the entropy of the single deterministic softmax. The AUROC printed below is the probability that a wrong prediction has a higher entropy than a right one (0.5: the entropy says nothing about errors); the mutual information is the part of the MC entropy that comes from disagreement between the passes (the model's own uncertainty), which the deterministic pass cannot give."""),
    ("code", """mc = MCDropout(num_samples=30)
(det,) = trainer(callbacks=[mc]).test(dropout_model, datamodule=DigitsDataModule(), verbose=False)
print({'deterministic test_acc': round(det['test_acc'], 4), 'deterministic test_loss': round(det['test_loss'], 4)})
print({k: round(v, 4) for k, v in mc.last_metrics.items()})

out = mc_dropout_predict(dropout_model, x_test, num_samples=30, seed=0)
with torch.no_grad():
    p = dropout_model.eval()(x_test).softmax(1)
single = -(p * p.clamp_min(1e-12).log()).sum(1)
correct_mc = out['mean'].argmax(1) == y_test; correct_det = p.argmax(1) == y_test

fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True)
for ax, (title, entropy, correct) in zip(axes, [('deterministic pass (baseline)', single, correct_det),
                                               ('MC dropout, K = 30', out['entropy'], correct_mc)]):
    bins = np.linspace(0, float(max(single.max(), out['entropy'].max())), 30)
    ax.hist(entropy[correct].numpy(), bins=bins, alpha=0.6, density=True, label=f'correct ({int(correct.sum())})')
    ax.hist(entropy[~correct].numpy(), bins=bins, alpha=0.6, density=True, label=f'wrong ({int((~correct).sum())})')
    ax.set_title(title); ax.set_xlabel('predictive entropy (nats)'); ax.legend(fontsize=8)
axes[0].set_ylabel('density'); plt.tight_layout(); plt.show()
def auroc(score, positive):  # P(score of a random positive > score of a random negative), ties count half
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float((pos > neg).float().mean() + 0.5 * (pos == neg).float().mean())

for name, score, correct in [('deterministic entropy', single, correct_det), ('MC entropy', out['entropy'], correct_mc),
                             ('MC mutual information', out['mutual_info'], correct_mc)]:
    print(f'{name:22s} mean: correct {float(score[correct].mean()):.3f}, wrong {float(score[~correct].mean()):.3f}; '
          f'AUROC for errors {auroc(score, ~correct):.3f}')"""),
    ("md", """## 5. Weight noise

`WeightNoise(std)` perturbs the weights before each training forward pass and puts the clean values back before the optimizer step (Graves 2011), so the gradient is taken at `w + noise` and applied to `w`: checkpoints, validation and the weights after `fit` never hold noise. The training loss of the noisy run is measured at the noisy weights; the test accuracy is that of the clean weights. `ActivationNoise` adds Gaussian noise to the outputs of chosen layers (here the first ReLU) and `ActivationDropout` drops elements of them (here the last ReLU), through forward hooks active in training batches only and removed after `fit` - the model is not edited. One seed on a small CNN: read it as a demonstration of the mechanisms, not as a measured gain."""),
    ("code", """noise_runs = {'no noise': (baseline, baseline_losses),
              'WeightNoise(std=0.02)': fit_cnn([WeightNoise(std=0.02, seed=0)]),
              'ActivationNoise(["features.1"], std=0.2)': fit_cnn([ActivationNoise(['features.1'], std=0.2, seed=0, log=False)]),
              'ActivationDropout(["features.6"], p=0.2)': fit_cnn([ActivationDropout(['features.6'], p=0.2, seed=0)])}
fig, ax = plt.subplots(figsize=(6.5, 3))
smooth = lambda v: np.convolve(v, np.ones(10) / 10, mode='valid')
for (name, (model, losses)), colour in zip(noise_runs.items(), ['grey', 'tab:purple', 'tab:orange', 'tab:cyan']):
    ax.plot(smooth(losses), c=colour, label=name)
ax.set_xlabel('step'); ax.set_ylabel('training loss (10-step mean)'); ax.legend(fontsize=8); plt.show()
for name, (model, _) in noise_runs.items():
    print(f'{name:42s} test acc {accuracy(model):.3f}')"""),
    ("md", """## 6. Label smoothing: less over-confident predictions

`LabelSmoothing(0.1)` sets the module's own `nn.CrossEntropyLoss` to `label_smoothing=0.1` for the run (the criterion mechanism; restored afterwards). The targets become 0.9 / 0.1 spread over the classes, so the network stops pushing its top probability towards 1."""),
    ("code", """smoothed, _ = fit_cnn([LabelSmoothing(0.1)])
fig, ax = plt.subplots(figsize=(6.5, 3))
bins = np.linspace(0.1, 1, 37)
for (name, model), colour in zip([('no smoothing', baseline), ('LabelSmoothing(0.1)', smoothed)], ['grey', 'tab:green']):
    with torch.no_grad():
        confidence = model(x_test).softmax(1).max(1).values
    ax.hist(confidence.numpy(), bins=bins, histtype='step', lw=1.5, color=colour,
            label=f'{name}: mean {float(confidence.mean()):.3f}, test acc {accuracy(model):.3f}')
ax.set_xlabel('top softmax probability on the test set'); ax.set_ylabel('samples'); ax.set_yscale('log')
ax.legend(fontsize=8); plt.show()
print('criterion after fit:', smoothed.criterion)"""),
    ("md", """## 7. Adversarial training: accuracy under attack

`AdversarialTraining("pgd", eps=0.1, steps=3)` adds the loss on PGD examples (Madry et al. 2018) of each training batch to the loss `training_step` returns; `VirtualAdversarialTraining` adds VAT's smoothness term (Miyato et al. 2018), which needs no labels. Same small MLP, seed and data order for the three runs; then every test image is attacked with a 10-step L-inf PGD (`pgd`, the functional core) of growing radius `eps` (pixels are in [0, 1]). `eps = 0` is the clean accuracy."""),
    ("code", """ce = torch.nn.CrossEntropyLoss()
radii = [0.0, 0.05, 0.1, 0.15, 0.2]
robust = {}
for name, extra in [('standard training', []),
                    ('AdversarialTraining("pgd", eps=0.1)',
                     [AdversarialTraining('pgd', eps=0.1, steps=3, input_range=[0.0, 1.0], log=False)]),
                    ('VirtualAdversarialTraining(eps=1.0)',
                     [VirtualAdversarialTraining(eps=1.0, input_range=[0.0, 1.0], log=False)])]:
    L.seed_everything(0, verbose=False)
    model = DeepMLP(depth=3, width=64, optimizer='adam', lr=1e-2)
    trainer(max_epochs=6, callbacks=extra).fit(model, datamodule=DigitsDataModule())
    model.eval()
    robust[name] = []
    for eps in radii:
        x_adv = x_test if eps == 0 else pgd(model, x_test, y_test, ce, eps, steps=10, input_range=(0.0, 1.0),
                                             generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            robust[name].append(float((model(x_adv).argmax(1) == y_test).float().mean()))

fig, ax = plt.subplots(figsize=(6.5, 3))
for (name, accs), colour in zip(robust.items(), ['grey', 'tab:red', 'tab:blue']):
    ax.plot(radii, accs, 'o-', c=colour, label=name)
ax.set_xlabel('PGD radius eps (L-inf, 10 steps)'); ax.set_ylabel('test accuracy'); ax.set_ylim(0, 1)
ax.legend(fontsize=8); plt.show()
for name, accs in robust.items():
    print(f'{name:38s} clean {accs[0]:.3f}   under PGD eps=0.1: {accs[2]:.3f}')"""),
    ("md", """## 8. Batch normalisation with tiny batches: `PreciseBN` and `NormSwap`

The CNN with a `BatchNorm2d` after each convolution (`DigitsCNN(batch_norm=True)`), trained with batches of 2 and, for reference, of 64. With tiny batches BatchNorm normalises by two-sample statistics and its running averages (used at test time) are an exponential moving average of them. `PreciseBN(batch_size=64)` recomputes the running statistics as true averages over training batches of 64 at the end of `fit` (Wu & Johnson 2021); `NormSwap(to="group")` replaces every BatchNorm by a GroupNorm (Wu & He 2018), which does not depend on the batch. Same seed and data order; test accuracy after 300 steps. Read the bars for what they are on this small CNN: BatchNorm still copes with batches of two here, and the GroupNorm version learns much more slowly in 300 tiny-batch steps than with batches of 64 - the swap is for models whose BatchNorm breaks down with tiny batches; measure before switching."""),
    ("code", """from lightning_techniques import NormSwap, PreciseBN

bn_runs = {}
for batch_size in (2, 64):
    for name, extra in [('BatchNorm', []), ('+ PreciseBN(batch_size=64)', [PreciseBN(num_batches=20, batch_size=64)]),
                        ('+ NormSwap(to="group", num_groups=4)', [NormSwap(to='group', num_groups=4)])]:
        L.seed_everything(0, verbose=False)
        model = DigitsCNN(channels=16, lr=3e-3, batch_norm=True)
        trainer(max_steps=300, callbacks=extra).fit(model, datamodule=DigitsDataModule(batch_size=batch_size))
        bn_runs[f'{name}, batch {batch_size}'] = accuracy(model.eval())

fig, ax = plt.subplots(figsize=(6.5, 3))
ax.barh(list(bn_runs), list(bn_runs.values()), color=['grey', 'tab:green', 'tab:purple'] * 2)
for i, v in enumerate(bn_runs.values()):
    ax.text(v, i, f' {v:.3f}', va='center')
ax.set_xlim(0, 1.15); ax.set_xlabel('test accuracy'); ax.invert_yaxis(); plt.tight_layout(); plt.show()"""),
]

if __name__ == "__main__":
    from _nbtools import build

    build(NOTEBOOK, CELLS)
