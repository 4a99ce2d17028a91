"""Cells of notebooks/08_evaluation_and_interpretation.ipynb, part 2 (attribution loggers); `_build_08.py`
builds it."""

import nbformat

md = nbformat.v4.new_markdown_cell
code = nbformat.v4.new_code_cell

cells = [
    md(
        "# Part 2: attribution loggers - saliency, Integrated Gradients, DeepLIFT, Grad-CAM, SHAP, LIME\n\n"
        "Each logger is a callback on a stock `lightning.Trainer`. It picks a fixed set of validation samples once "
        "(one per class, or the most confidently wrong), and every `every_n_epochs` validation runs (and at test end) "
        "writes, on rank 0 only, an overlay image, the raw attribution arrays and a samples table to whatever logger "
        "is attached (files under `<log_dir>/artifacts/` in any case). They work inside Lightning's "
        "`inference_mode` evaluation and leave the model's modes, `requires_grad` flags and the random state as they "
        "found them.\n\n"
        "1. All six on the bundled digits with `DigitsCNN`.\n"
        "2. Evidence on a task whose answer is known: does the attribution land on the one informative patch?"
    ),
    code(
        "import logging, tempfile, warnings\n"
        "from pathlib import Path\n"
        "import lightning as L\n"
        "import numpy as np\n"
        "import torch\n"
        "from IPython.display import Image, display\n\n"
        "from lightning_techniques import (DeepLiftLogger, GradCAMLogger, IntegratedGradientsLogger, LIMELogger,\n"
        "                                  SaliencyLogger, SHAPLogger, mass_fraction)\n"
        "from lightning_techniques.demo import ClassifierModule, DigitsCNN, DigitsDataModule, LabeledTensorDataset\n\n"
        "warnings.filterwarnings('ignore')\n"
        "logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)\n"
        "torch.set_num_threads(1)  # tiny models: one thread is fastest\n"
        "root = Path(tempfile.mkdtemp())\n\n"
        "def trainer(**kw):\n"
        "    return L.Trainer(accelerator='cpu', logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
        "                     enable_model_summary=False, num_sanity_val_steps=0, **kw)"
    ),
    md(
        "## 1. Six loggers on digits\n\n"
        "Grad-CAM finds the last `nn.Conv2d` itself (`features.5`); SHAP uses `DeepExplainer` because `DigitsCNN` "
        "is built from modules it understands (`explainer='auto'`), with 32 training images as background; LIME "
        "explains the 5 most confidently wrong samples over 2x2 superpixels."
    ),
    code(
        "L.seed_everything(0, verbose=False)\n"
        "common = dict(every_n_epochs=8, max_samples=10)\n"
        "loggers = [SaliencyLogger(**common), IntegratedGradientsLogger(n_steps=32, **common), DeepLiftLogger(**common),\n"
        "           GradCAMLogger(**common), SHAPLogger(explainer='auto', background_size=32, **common),\n"
        "           LIMELogger(n_samples=100, selection='confident_wrong', every_n_epochs=8, max_samples=5)]\n"
        "model, data = DigitsCNN(channels=16, lr=1e-2), DigitsDataModule(batch_size=32)\n"
        "t = trainer(max_epochs=8, callbacks=loggers, default_root_dir=str(root / 'digits'))  # logs at epoch 8\n"
        "t.fit(model, datamodule=data)\n"
        "print('val_acc', round(float(t.callback_metrics['val_acc']), 3), '| Grad-CAM layer:', loggers[3].resolved_layer,\n"
        "      '| SHAP explainer:', loggers[4].explainer_used)\n"
        "artefacts = root / 'digits' / 'artifacts'\n"
        "sorted(str(p.relative_to(artefacts)) for p in artefacts.rglob('*overlay*'))"
    ),
    md("Top row: the inputs (one per class, 0 to 9); bottom row: the attribution magnitude over them."),
    code(
        "for name in ['saliency', 'integrated_gradients', 'deeplift', 'gradcam', 'shap', 'lime']:\n"
        "    print(name)\n"
        "    display(Image(filename=str(next((artefacts / name / 'val').glob('overlay_*.png')))))"
    ),
    md(
        "Integrated Gradients reports its **completeness check** each time: the attributions of a sample sum to "
        "`f(x) - f(baseline)` of the explained logit, up to the error of the 32-point path integral."
    ),
    code(
        "print((next((artefacts / 'integrated_gradients' / 'val').glob('completeness_*.md'))).read_text())\n"
        "{k: round(v, 5) for k, v in loggers[1].history[-1].items() if isinstance(v, float)}"
    ),
    md(
        "## 2. Evidence: a task whose answer is known\n\n"
        "12x12 noise images; class 1 iff a bright 3x3 patch sits at one of two fixed places. A tiny CNN learns it in "
        "a few dozen steps. A faithful attribution of a class-1 sample puts its mass on the patch, which covers only "
        "9/144 = 6% of the image."
    ),
    code(
        "def patch_data(n, seed):\n"
        "    g = torch.Generator().manual_seed(seed)\n"
        "    x, y = torch.rand(n, 1, 12, 12, generator=g) * 0.5, torch.randint(0, 2, (n,), generator=g)\n"
        "    mask = torch.zeros(n, 12, 12, dtype=torch.bool)\n"
        "    for i, (r, c) in enumerate([((2, 2), (7, 7))[k] for k in torch.randint(0, 2, (n,), generator=g)]):\n"
        "        mask[i, r:r + 3, c:c + 3] = True\n"
        "        x[i, 0, r:r + 3, c:c + 3] += float(y[i])\n"
        "    return LabeledTensorDataset(x, y), mask\n\n"
        "class PatchData(L.LightningDataModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        (self.train_set, _), (self.val_set, self.val_mask) = patch_data(512, 1), patch_data(64, 2)\n"
        "    def train_dataloader(self):\n"
        "        return torch.utils.data.DataLoader(self.train_set, batch_size=32, shuffle=True)\n"
        "    def val_dataloader(self):\n"
        "        return torch.utils.data.DataLoader(self.val_set, batch_size=64)\n\n"
        "class PatchCNN(ClassifierModule):\n"
        "    def __init__(self):\n"
        "        super().__init__(lr=2e-2)\n"
        "        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),\n"
        "                                            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU())\n"
        "        self.head = torch.nn.Linear(8, 2)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.features(x).mean(dim=(2, 3)))\n\n"
        "L.seed_everything(0, verbose=False)\n"
        "kw = dict(every_n_epochs=4, samples_per_class=4, max_samples=8, explain='label')\n"
        "patch_loggers = [SaliencyLogger(**kw), IntegratedGradientsLogger(**kw), DeepLiftLogger(**kw), GradCAMLogger(**kw),\n"
        "                 SHAPLogger(explainer='auto', **kw),\n"
        "                 LIMELogger(superpixel_size=1, n_samples=300, **{**kw, 'samples_per_class': 1})]  # LIME: slowest\n"
        "pdata = PatchData()\n"
        "t = trainer(max_epochs=4, limit_train_batches=12, callbacks=patch_loggers, default_root_dir=str(root / 'patch'))\n"
        "t.fit(PatchCNN(), datamodule=pdata)\n"
        "print('val_acc', float(t.callback_metrics['val_acc']))"
    ),
    code(
        "print(f\"{'method':>22}  attribution mass on the patch (class-1 samples; patch area = {9 / 144:.1%})\")\n"
        "for logger in patch_loggers:\n"
        "    idx = logger.indices['val']\n"
        "    positive = pdata.val_set.targets[idx] == 1\n"
        "    frac = mass_fraction(logger.last['attributions'][positive], pdata.val_mask[idx][positive])\n"
        "    print(f'{logger.name:>22}  mean {frac.mean():.0%}   min {frac.min():.0%}')"
    ),
    code(
        "patch_art = root / 'patch' / 'artifacts'\n"
        "for name in ['integrated_gradients', 'gradcam']:\n"
        "    print(name, '(first 4 columns: class 0, last 4: class 1)')\n"
        "    display(Image(filename=str(next((patch_art / name / 'val').glob('overlay_*.png')))))"
    ),
    md(
        "All six methods put most of their mass on the 6% of the image that decides the class. Cost: see "
        "`benchmarks/attribution_cost.py` (seconds per logging event vs. the epoch time) in `benchmarks/RESULTS.md`."
    ),
]

