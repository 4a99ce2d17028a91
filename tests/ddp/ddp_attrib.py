"""DDP run (2 CPU processes, gloo) for the attribution loggers (IG, Grad-CAM, SHAP).

Launched by tests/test_interpret_attribution.py as ``python ddp_attrib.py --out DIR``; Lightning re-launches it for
rank 1. The loggers must work on rank 0 only (with the unwrapped module, no collective), rank 1 must neither log nor
wait, and training must be unaffected: the ranks' weights agree at the end.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_techniques import (
    DeepLiftLogger,
    GradCAMLogger,
    IntegratedGradientsLogger,
    LIMELogger,
    SaliencyLogger,
    SHAPLogger,
)
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.regularization.early_stopping import snapshot_state
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def main() -> None:
    out = script_out_dir()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    ig = IntegratedGradientsLogger(n_steps=16, max_samples=4, every_n_val_epochs=1)
    cam = GradCAMLogger(max_samples=4, every_n_val_epochs=1)
    shap = SHAPLogger(explainer="auto", background_size=8, max_samples=2, every_n_val_epochs=1)
    saliency = SaliencyLogger(max_samples=2, every_n_val_epochs=1)
    deeplift = DeepLiftLogger(max_samples=2, every_n_val_epochs=1)
    lime = LIMELogger(n_samples=20, max_samples=2, every_n_val_epochs=1)
    model = DigitsCNN(channels=8)
    root = out / "run"
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        max_epochs=2, limit_train_batches=4, limit_val_batches=2, default_root_dir=str(root),
                        callbacks=[ig, cam, shap, saliency, deeplift, lime])
    trainer.fit(model, datamodule=DigitsDataModule())
    artefacts = Path(root) / "artifacts"
    save_rank_result(out, trainer.global_rank, {
        "weights": snapshot_state(model),
        "validation_runs": ig.validation_runs,
        "events": {"ig": len(ig.history), "gradcam": len(cam.history), "shap": len(shap.history),
                   "saliency": len(saliency.history), "deeplift": len(deeplift.history), "lime": len(lime.history)},
        "artifact_files": sum(1 for p in artefacts.rglob("*") if p.is_file()) if artefacts.exists() else 0,
        "completeness_gap": max((h["completeness_relative_gap_max"] for h in ig.history), default=0.0),
        "finished": True,
    })


if __name__ == "__main__":
    main()
