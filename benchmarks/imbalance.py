"""Class imbalance: baseline vs. class-weighted loss vs. focal loss vs. oversampling, side by side.

Balanced accuracy and macro-F1 on the (naturally balanced) test split of
* digits with classes 0, 1 and 2 cut to 5 % of their training samples (``DigitsDataModule(keep_fraction=...)``);
* breast-cancer (212 malignant vs. 357 benign), TabularMLP on the raw features.
Run from the repository root: ``python -m benchmarks.imbalance``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import markdown_table, median, quiet_trainer, record, side_by_side
from lightning_techniques import ClassWeightedLoss, Oversampling
from lightning_techniques.demo import BreastCancerDataModule, DeepMLP, DigitsDataModule, TabularMLP

SEEDS = [0, 1, 2]
DIGITS_CUT = {0: 0.05, 1: 0.05, 2: 0.05}

VARIANTS: dict[str, Callable[[], list[Callback]]] = {
    "baseline": lambda: [],
    "ClassWeightedLoss(inverse)": lambda: [ClassWeightedLoss(mode="inverse")],
    "ClassWeightedLoss(effective, focal 2)": lambda: [ClassWeightedLoss(mode="effective", beta=0.999, focal_gamma=2.0)],
    "Oversampling(inverse)": lambda: [Oversampling(mode="inverse")],
}


def scores(module: L.LightningModule, datamodule: L.LightningDataModule) -> tuple[float, float, float]:
    from sklearn.metrics import balanced_accuracy_score, f1_score

    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    module.eval()
    preds, targets = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(module(x).argmax(1))
            targets.append(y)
    p, t = torch.cat(preds).numpy(), torch.cat(targets).numpy()
    minority = [c for c in DIGITS_CUT] if len(set(t.tolist())) == 10 else [0]
    recall_min = float(sum(((p == c) & (t == c)).sum() for c in minority) / sum((t == c).sum() for c in minority))
    return float(balanced_accuracy_score(t, p)), float(f1_score(t, p, average="macro")), recall_min


def make_run(dataset: str, callbacks: Callable[[], list[Callback]], seeds: list[int]) -> Callable[[], Any]:
    it = iter(seeds)

    def run() -> tuple[float, float, float]:
        seed = next(it)
        L.seed_everything(seed, verbose=False)
        if dataset == "digits":
            dm: L.LightningDataModule = DigitsDataModule(batch_size=64, keep_fraction=DIGITS_CUT, seed=seed)
            module: L.LightningModule = DeepMLP(depth=3, lr=0.05)
            steps = 200
        else:
            dm = BreastCancerDataModule(batch_size=32, seed=seed)
            module = TabularMLP()
            steps = 200
        quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks()).fit(module, datamodule=dm)
        return scores(module, dm)

    return run


def main() -> None:
    torch.set_num_threads(1)
    sections = []
    for dataset, label in (("digits", f"digits, classes {sorted(DIGITS_CUT)} cut to 5 % (DeepMLP(depth=3), SGD, 200 steps)"),
                           ("breast_cancer", "breast-cancer, raw features (TabularMLP, Adam, 200 steps)")):
        results = side_by_side({name: make_run(dataset, cbs, SEEDS) for name, cbs in VARIANTS.items()},
                               repeats=len(SEEDS))
        rows = []
        for name, runs in results.items():
            rows.append({
                "variant": name,
                "balanced acc (median)": median([r[0] for r in runs]),
                "macro-F1 (median)": median([r[1] for r in runs]),
                "minority recall (median)": median([r[2] for r in runs]),
                "balanced acc per seed": ", ".join(f"{r[0]:.3f}" for r in runs),
            })
        sections.append(f"**{label}**, seeds {SEEDS} (data split and init per seed), variants interleaved "
                        f"round-robin. Test split keeps the natural class balance.\n\n" + markdown_table(rows))
    record("imbalance", "Class imbalance: balanced accuracy and macro-F1 (baseline vs weighted loss vs "
           "oversampling)", "\n\n".join(sections) + "\n\nMinority recall: recall over the cut classes (digits) or "
           "the malignant class 0 (breast-cancer).")


if __name__ == "__main__":
    main()
