"""Mixed precision on a CUDA GPU: fp32 vs. SmartMixedPrecision (auto, and fp16 + GradScaler), side by side.

    python -m benchmarks.amp [--steps 200] [--repeats 3]

Needs a CUDA GPU and refuses to run without one (CPU autocast timings say nothing about GPU mixed precision).
Reports per variant: median time per training step (after 10 warm-up steps; the GPU is synchronised at each batch
end), peak GPU memory
(``torch.cuda.max_memory_allocated``), validation accuracy, and the number of steps the GradScaler skipped.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.runner import StepTimer, markdown_table, median, record, side_by_side
from lightning_techniques import SmartMixedPrecision
from lightning_techniques.demo import DigitsDataModule, TinyTransformer


class CudaSync(Callback):
    """Waits for the GPU at each batch end (listed before StepTimer), so step times include the kernels."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()


def run(variant: str, steps: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    model = TinyTransformer(d_model=256, heads=8, layers=6)
    plugins = [] if variant == "32-true" else [SmartMixedPrecision(variant, fp32_modules=["head"])]
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, plugins=plugins, callbacks=[CudaSync(), timer],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    datamodule = DigitsDataModule(batch_size=256)
    trainer.fit(model, datamodule=datamodule)
    peak = torch.cuda.max_memory_allocated()
    (val,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    return {
        "precision": trainer.precision,
        "step_s": median(timer.times[10:]),
        "peak_mib": peak / 2**20,
        "val_acc": float(val["val_acc"]),
        "skipped": len(plugins[0].skipped_steps) if plugins else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "benchmarks.amp needs a CUDA GPU and none is available here: mixed-precision speed and memory are "
            "GPU properties, so nothing is measured or recorded on CPU."
        )
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    variants = {name: (lambda name=name: run(name, args.steps)) for name in ("32-true", "auto", "16-mixed")}
    results = side_by_side(variants, repeats=args.repeats)
    base = median([r["step_s"] for r in results["32-true"]])
    rows = []
    for name, runs in results.items():
        step_s = median([r["step_s"] for r in runs])
        rows.append({
            "variant": "fp32 (no plugin)" if name == "32-true" else f"SmartMixedPrecision({name!r})",
            "precision used": runs[0]["precision"],
            "ms / step": 1000 * step_s,
            "speed-up vs fp32": base / step_s,
            "peak GPU MiB": median([r["peak_mib"] for r in runs]),
            "val acc": median([r["val_acc"] for r in runs]),
            "scaler-skipped steps": runs[0]["skipped"],
        })
    body = (
        f"TinyTransformer (d_model 256, 8 heads, 6 blocks, head kept in fp32) on digits, batch 256, {args.steps} "
        f"steps, median of {args.repeats} interleaved repeats (first 10 steps of each run excluded).\n\n"
        + markdown_table(rows)
    )
    record("amp", "Mixed precision on GPU: fp32 vs. SmartMixedPrecision", body)


if __name__ == "__main__":
    main()
