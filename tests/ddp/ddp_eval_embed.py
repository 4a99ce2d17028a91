"""DDP script of the eval_embed group (EvaluationReport, PermutationImportance, TSNELogger, AttentionMapLogger; the
last also on a Hugging Face BERT when transformers is installed, in a second Trainer in the same processes).

Launched by tests/test_evaluation.py::test_ddp_eval_embed_group as ``python ddp_eval_embed.py --out DIR``; Lightning
starts the second rank. Each rank saves what it observed; the test asserts the ranks agree, that the synchronised
report equals the metrics of the whole evaluation set, and that the interpretation loggers ran on rank 0 only.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch

from lightning_techniques import AttentionMapLogger, EvaluationReport, PermutationImportance, TSNELogger
from lightning_techniques._internal.artifacts import artifact_dir
from lightning_techniques.demo.data import DigitsDataModule, TokenPresenceDataModule
from lightning_techniques.demo.models import TinyBert, TinyTransformer
from lightning_techniques.evaluation.report import classification_scalars, outputs_to_probabilities
from lightning_techniques.testing import save_rank_result, script_out_dir

warnings.filterwarnings("ignore")


def reference(model: torch.nn.Module, dataset) -> dict[str, float]:
    """The metrics of the whole dataset, computed by this rank alone (no DDP, no callback)."""
    model.eval()
    with torch.no_grad():
        probs = outputs_to_probabilities(model(dataset.inputs))
    return classification_scalars(probs, dataset.targets)


def main() -> None:
    out = script_out_dir()
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=32)
    model = TinyTransformer(d_model=16, heads=2)
    report = EvaluationReport(bootstrap_resamples=50, figures=False)
    importance = PermutationImportance(layers=["blocks.0.attn", "head"], n_repeats=1, max_samples=64)
    tsne = TSNELogger(every_n_val_epochs=1, on_test=False, max_samples=100, max_iter=250)
    attention = AttentionMapLogger(every_n_val_epochs=1, num_samples=1)
    trainer = L.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=4,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out / "run"),
        callbacks=[report, importance, tsne, attention],
    )
    trainer.fit(model, datamodule=dm)
    val_reference = reference(model, dm.val_dataset)
    trainer.test(model, datamodule=dm, verbose=False)
    test_reference = reference(model, dm.test_dataset)
    rank = trainer.global_rank
    files = sum(1 for p in artifact_dir(trainer).rglob("*") if p.is_file()) if rank == 0 else 0
    result = {
        "weights": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "val_scalars": report.results["val"]["scalars"],
        "test_scalars": report.results["test"]["scalars"],
        "test_ci": {k: list(v) for k, v in report.results["test"]["ci"].items()},
        "confusion": report.results["test"]["confusion_matrix"],
        "n_test": report.results["test"]["n"],
        "test_size": len(dm.test_dataset),
        "importance": {"layers": importance.results["test"]["layers"], "features": importance.results["test"]["features"]},
        "val_reference": val_reference,
        "test_reference": test_reference,
        "attention_layers": len(attention.last_maps),
        "tsne_points": len(tsne.last.get("labels", [])),
        "artifact_files": files,
    }
    try:
        import transformers  # noqa: F401
    except ImportError:
        save_rank_result(out, rank, result)
        return
    # a Hugging Face model (SDPA) under the same DDP processes: captured on rank 0 only, ranks stay in step
    L.seed_everything(0)
    bert = TinyBert()
    hf_attention = AttentionMapLogger(layers=["*.attention.self"], every_n_val_epochs=1, num_samples=2)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, limit_train_batches=3,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out / "bert"), callbacks=[hf_attention])
    trainer.fit(bert, datamodule=TokenPresenceDataModule(n_samples=256))
    result["hf_weights"] = {k: v.detach().cpu() for k, v in bert.state_dict().items()}
    result["hf_attention_layers"] = sorted(hf_attention.last_maps)
    save_rank_result(out, rank, result)


if __name__ == "__main__":
    main()
