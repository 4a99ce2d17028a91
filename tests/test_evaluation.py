"""EvaluationReport and PermutationImportance: metric cores vs scikit-learn / hand computation, integration on the
demo digits, exact resume, bad input, and the DDP script of the eval_embed group."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchmetrics.functional.classification as tmc
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques import EvaluationReport, PermutationImportance
from lightning_techniques.demo.data import DigitsDataModule
from lightning_techniques.demo.models import DigitsCNN
from lightning_techniques.evaluation.importance import ablation_importance, permutation_importance
from lightning_techniques.evaluation.report import (
    bootstrap_ci,
    classification_report,
    classification_scalars,
    fast_classification_scalars,
    outputs_to_probabilities,
    regression_scalars,
    reliability_bins,
)
from lightning_techniques.testing import assert_exact_resume, assert_ranks_agree, run_ddp_script

warnings.filterwarnings("ignore", ".*LeafSpec.*")
ROOT = Path(__file__).resolve().parents[1]


def _random_probs(n: int, c: int, seed: int, strength: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + strength * nn.functional.one_hot(y, c)
    return outputs_to_probabilities(logits), y


# ----------------------------------------------------------------------------------------------- unit: metrics
@pytest.mark.parametrize("classes", [2, 5])
def test_classification_scalars_match_sklearn(classes: int) -> None:
    probs, y = _random_probs(300, classes, seed=classes)
    got = classification_scalars(probs, y)
    yp, yn, pn = probs.argmax(1).numpy(), y.numpy(), probs.double().numpy()
    ref = {
        "accuracy": skm.accuracy_score(yn, yp),
        "balanced_accuracy": skm.balanced_accuracy_score(yn, yp),
        "precision_macro": skm.precision_score(yn, yp, average="macro"),
        "recall_macro": skm.recall_score(yn, yp, average="macro"),
        "f1_macro": skm.f1_score(yn, yp, average="macro"),
        "precision_micro": skm.precision_score(yn, yp, average="micro"),
        "f1_micro": skm.f1_score(yn, yp, average="micro"),
    }
    if classes == 2:
        ref["auroc"] = skm.roc_auc_score(yn, pn[:, 1])
        ref["average_precision"] = skm.average_precision_score(yn, pn[:, 1])
    else:
        ref["auroc"] = skm.roc_auc_score(yn, pn, multi_class="ovr", average="macro")
        ref["average_precision"] = skm.average_precision_score(np.eye(classes)[yn], pn, average="macro")
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    report = classification_report(probs, y)
    assert torch.equal(report["confusion_matrix"], torch.from_numpy(skm.confusion_matrix(yn, yp)).long())
    per_class_f1 = skm.f1_score(yn, yp, average=None)
    assert np.allclose(report["per_class"]["f1"], per_class_f1, atol=1e-6)


def test_reliability_bins_and_ece_by_hand() -> None:
    # confidences 0.95 (right), 0.95 (wrong), 0.55 (right), 0.65 (right) in 10 bins:
    # bin 9: conf 0.95, acc 0.5, 2 samples; bin 5: conf 0.55, acc 1; bin 6: conf 0.65, acc 1
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.65, 0.35]])
    y = torch.tensor([0, 1, 1, 0])
    bins = reliability_bins(probs, y, n_bins=10)
    expected = 2 / 4 * abs(0.5 - 0.95) + 1 / 4 * abs(1 - 0.55) + 1 / 4 * abs(1 - 0.65)
    assert float(bins["ece"]) == pytest.approx(expected, abs=1e-6)
    assert bins["count"].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 2]
    assert float(bins["accuracy"][9]) == pytest.approx(0.5)
    assert classification_scalars(probs, y, n_bins=10)["ece"] == pytest.approx(expected, abs=1e-6)
    # confidence exactly 1.0 is binned as torchmetrics does
    probs1 = torch.tensor([[1.0, 0.0], [0.7, 0.3], [0.2, 0.8]])
    y1 = torch.tensor([1, 0, 1])
    tm = float(tmc.multiclass_calibration_error(probs1, y1, 2, n_bins=15))
    assert float(reliability_bins(probs1, y1, 15)["ece"]) == pytest.approx(tm, abs=1e-6)


@pytest.mark.parametrize("classes", [2, 10])
def test_fast_scalars_equal_torchmetrics_on_bootstrap_resamples(classes: int) -> None:
    probs, y = _random_probs(200, classes, seed=3, strength=3.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        idx = torch.randint(0, 200, (200,), generator=g)  # resamples have ties and duplicated rows
        a = classification_scalars(probs[idx], y[idx])
        b = fast_classification_scalars(probs[idx], y[idx])
        for key in a:
            assert b[key] == pytest.approx(a[key], abs=1e-5), key


def test_bootstrap_interval_matches_binomial_width() -> None:
    probs, y = _random_probs(400, 4, seed=0)
    acc = classification_scalars(probs, y)["accuracy"]
    def accuracy_only(p: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
        return {"accuracy": float((p.argmax(1) == t).double().mean())}

    ci = bootstrap_ci(accuracy_only, probs, y, n_resamples=400, confidence=0.95, seed=0)
    lo, hi = ci["accuracy"]
    assert lo < acc < hi
    normal_width = 2 * 1.96 * math.sqrt(acc * (1 - acc) / 400)
    assert (hi - lo) == pytest.approx(normal_width, rel=0.25)
    small = bootstrap_ci(fast_classification_scalars, probs[:100], y[:100], 20, 0.95, seed=0)
    assert bootstrap_ci(fast_classification_scalars, probs[:100], y[:100], 20, 0.95, seed=0) == small  # seeded
    assert small["ece"][0] <= small["ece"][1] and small["auroc"][0] <= small["auroc"][1]


def test_regression_scalars_match_sklearn() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randn(100, generator=g)
    pred = y + 0.3 * torch.randn(100, generator=g)
    got = regression_scalars(pred, y)
    assert got["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-6)
    assert got["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, pred)), abs=1e-6)
    assert got["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-5)


# ----------------------------------------------------------------------------------------------- integration
def _trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                callbacks=callbacks, deterministic=True)
    base.update(kw)
    return L.Trainer(**base)


def test_report_on_digits_agrees_with_module_and_data(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    report = EvaluationReport(bootstrap_resamples=30, class_names=[f"d{i}" for i in range(10)])
    model = DigitsCNN(channels=8)
    trainer = _trainer(tmp_path, [report], max_steps=10, val_check_interval=5, limit_val_batches=1)
    trainer.fit(model, datamodule=dm)
    assert report.val_epochs_seen == 2
    assert set(report.results) == {"val"} and "ci" not in report.results["val"]  # no bootstrap at validation
    out = trainer.test(model, datamodule=dm, verbose=False)[0]
    res = report.results["test"]
    # the report saw exactly what the module's own test_step saw
    assert res["scalars"]["accuracy"] == pytest.approx(out["test_acc"], abs=1e-6)
    assert out["report/test_accuracy"] == pytest.approx(out["test_acc"], abs=1e-6)
    cm = res["confusion_matrix"]
    support = torch.bincount(dm.test_dataset.targets, minlength=10)
    assert int(cm.sum()) == len(dm.test_dataset) == res["n"]
    assert torch.equal(cm.sum(dim=1), support)
    assert res["scalars"]["balanced_accuracy"] == pytest.approx(float((cm.diag() / support).mean()), abs=1e-6)
    lo, hi = res["ci"]["accuracy"]
    assert lo <= res["scalars"]["accuracy"] <= hi and hi - lo > 0
    files = {p.name.split("_step")[0].split("_latest")[0] for p in (tmp_path / "artifacts" / "evaluation").iterdir()}
    assert {"test_metrics", "test_per_class", "test_confusion_matrix", "test_reliability", "val_metrics"} <= files
    assert "val_reliability" not in files  # figures only at test by default
    csv = next((tmp_path / "artifacts" / "evaluation").glob("test_metrics_step*.csv")).read_text().splitlines()
    assert csv[0] == "metric,value,ci_low,ci_high" and len(csv) == 12


class _Regressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class _NoForward(_Regressor):
    def validation_step(self, batch, batch_idx):  # computes without calling self(...)
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self.net(x).squeeze(-1), y))


def _regression_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(96, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def test_regression_report_and_capture_modes(tmp_path: Path) -> None:
    L.seed_everything(0)
    model = _Regressor()
    report = EvaluationReport(figures=False)
    trainer = _trainer(tmp_path, [report], max_steps=3)
    loader = _regression_loader()
    trainer.fit(model, loader, loader)
    x, y = loader.dataset.tensors
    with torch.no_grad():
        pred = model(x)
    expected = {"mae": float((pred - y).abs().mean()), "rmse": float((pred - y).pow(2).mean().sqrt())}
    assert report.results["val"]["task"] == "regression"
    for key, value in expected.items():
        assert report.results["val"]["scalars"][key] == pytest.approx(value, rel=1e-5)
    # a step that never calls self(...) is reported clearly, and capture="rerun" handles it
    with pytest.raises(RuntimeError, match="capture='rerun'"):
        _trainer(tmp_path / "a", [EvaluationReport(figures=False)], max_steps=1).validate(_NoForward(), loader, verbose=False)
    rerun = EvaluationReport(figures=False, capture="rerun")
    other = _NoForward()
    other.load_state_dict(model.state_dict())
    _trainer(tmp_path / "b", [rerun], max_steps=1).validate(other, loader, verbose=False)
    assert rerun.results["val"]["scalars"]["mae"] == pytest.approx(expected["mae"], rel=1e-5)


def test_callbacks_leave_training_bit_identical(tmp_path: Path) -> None:
    def run(callbacks: list) -> dict:
        L.seed_everything(0)
        model = DigitsCNN(channels=8)
        _trainer(tmp_path, callbacks, max_steps=6, val_check_interval=3, limit_val_batches=1).fit(
            model, datamodule=DigitsDataModule())
        return model.state_dict()

    plain = run([])
    with_report = run([EvaluationReport(figures=False), PermutationImportance(stages=["validate"], n_repeats=1,
                                                                              max_samples=64)])
    for key in plain:
        assert torch.equal(plain[key], with_report[key]), key


def test_report_exact_resume(tmp_path: Path) -> None:
    assert_exact_resume(
        lambda: DigitsCNN(channels=8),
        lambda: DigitsDataModule(batch_size=64),
        lambda: [EvaluationReport(figures=False, every_n_val_epochs=2),
                 PermutationImportance(features=False, layers=["head"], stages=["validate"], every_n_val_epochs=2,
                                       max_samples=32)],
        tmp_path,
        total_steps=8,
        # the checkpoint is written at the end of step 3's batch; (a checkpoint written at the end of a batch that is
        # followed by a validation makes Lightning skip that validation on resume, and the counters follow it)
        split_step=3,
        trainer_kwargs={"val_check_interval": 2, "limit_val_batches": 1},
    )


# ----------------------------------------------------------------------------------------------- importance
def test_permutation_importance_by_hand() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 4)
    x[:, 2] = 1.0  # a constant feature
    y = (x[:, 0] > 0).long()
    model = nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
        model.weight[1, 0] = 5.0  # only feature 0 matters
    res = permutation_importance(model, x, y, "accuracy", n_repeats=3, seed=0)
    assert res["baseline"] == 1.0
    assert res["importance"][0] > 0.3  # permuting the only informative feature ~ halves accuracy
    assert res["importance"][1:].abs().max() == 0.0  # ignored and constant features: exactly 0
    # same result whatever the number of copies stacked into one forward call
    res2 = permutation_importance(model, x, y, "accuracy", n_repeats=3, seed=0, batch_size=50)
    assert torch.equal(res["importance"], res2["importance"])


def test_ablation_importance_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(90, 4), torch.randint(0, 3, (90,))
    with torch.no_grad():
        base_pred = model(x).argmax(1)
        # ablating the first layer: the head sees relu(0) = 0, so it predicts argmax(head.bias) for every sample
        constant = int(model[2](torch.zeros(1, 8)).argmax())
    res = ablation_importance(model, x, y, ["0", "2"], "accuracy")
    baseline = float((base_pred == y).double().mean())
    assert res["baseline"] == pytest.approx(baseline)
    assert res["importance"]["0"] == pytest.approx(baseline - float((y == constant).double().mean()))
    before = [p.clone() for p in model.parameters()]
    mean_res = ablation_importance(model, x, y, ["1"], "accuracy", mode="mean")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # weights untouched
    assert not model[1]._forward_hooks  # hooks removed
    assert math.isfinite(mean_res["importance"]["1"])
    with pytest.raises(ValueError, match="not in Sequential"):
        ablation_importance(model, x, y, ["nope"])


def test_permutation_importance_callback_on_digits(tmp_path: Path) -> None:
    L.seed_everything(0)
    dm = DigitsDataModule()
    model = DigitsCNN(channels=8)
    imp = PermutationImportance(layers=["head"], n_repeats=1, max_samples=100)
    trainer = _trainer(tmp_path, [imp], max_steps=5)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    res = imp.results["test"]
    assert res["n"] == 100 and res["features"].shape == (1, 8, 8)
    x = dm.test_dataset.inputs[:100]
    constant = (x.amax(0) == x.amin(0))[0]  # pixels that are the same in every evaluated image
    assert constant.any()
    assert res["features"][0][constant].abs().max() == 0.0
    # zero-ablating the head makes every logit 0, so argmax predicts class 0 for every sample
    y = dm.test_dataset.targets[:100]
    assert res["layers"]["head"] == pytest.approx(res["baseline"] - float((y == 0).double().mean()))
    names = {p.name.split("_step")[0] for p in (tmp_path / "artifacts" / "importance").iterdir()}
    assert {"test_features", "test_layers"} <= names


def test_bad_arguments_and_setup_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        EvaluationReport(task="segmentation")
    with pytest.raises(ValueError, match="stages"):
        EvaluationReport(stages=["train"])
    with pytest.raises(ValueError, match="confidence"):
        EvaluationReport(confidence=1.5)
    with pytest.raises(TypeError, match="every_n_val_epochs"):
        EvaluationReport(every_n_val_epochs=1.5)
    with pytest.raises(ValueError, match="capture"):
        EvaluationReport(capture="magic")
    with pytest.raises(ValueError, match="nothing to do"):
        PermutationImportance(features=False)
    with pytest.raises(ValueError, match="score"):
        PermutationImportance(score="f2")
    class NoForward(_Regressor):
        forward = L.LightningModule.forward

    with pytest.raises(TypeError, match="NoForward to define forward"):
        _trainer(tmp_path, [EvaluationReport(figures=False)], max_steps=1).validate(NoForward(), _regression_loader())
    trainer = _trainer(tmp_path, [PermutationImportance(layers=["head", "neck"])], max_steps=1)
    with pytest.raises(ValueError, match=r"\['neck'\] are not in DigitsCNN.*head"):
        trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule())


# ----------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_eval_embed_group(tmp_path: Path) -> None:
    results = run_ddp_script(ROOT / "tests" / "ddp" / "ddp_eval_embed.py", tmp_path)
    assert_ranks_agree(results, keys=["weights", "val_scalars", "test_scalars", "test_ci", "confusion", "importance"])
    assert_ranks_agree(results, keys=["val_reference", "test_reference"], atol=0)
    for rank, result in enumerate(results):
        # each rank evaluated half the data, yet the report equals the metrics of the whole set
        for stage in ("val", "test"):
            for key, value in result[f"{stage}_reference"].items():
                assert result[f"{stage}_scalars"][key] == pytest.approx(value, abs=1e-5), (rank, stage, key)
        assert result["n_test"] == result["test_size"]
    # the interpretation loggers ran on rank 0 only
    assert results[0]["attention_layers"] == 2 and results[1]["attention_layers"] == 0
    assert results[0]["tsne_points"] > 0 and results[1]["tsne_points"] == 0
    assert results[0]["artifact_files"] > 0
    if importlib.util.find_spec("transformers") is not None:  # the BERT run under DDP
        assert_ranks_agree(results, keys=["hf_weights"])
        assert results[0]["hf_attention_layers"] == [f"model.bert.encoder.layer.{i}.attention.self" for i in range(2)]
        assert results[1]["hf_attention_layers"] == []


# ----------------------------------------------------------------------------------------------- what a reader gets
def _report_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("EvaluationReport (")]


@pytest.mark.parametrize("summary, keep, lines, files", [
    ("end", False, 1, 6),        # one line when fit is over; one replaced set of 3 tables (csv + md)
    ("compact", False, 3, 6),    # one short line per validation report
    ("full", True, 3, 18),       # the old behaviour: every report printed in full and kept as its own files
])
def test_report_prints_once_and_writes_a_latest_set(tmp_path: Path, caplog, summary: str, keep: bool, lines: int,
                                                    files: int) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero")
    report = EvaluationReport(bootstrap_resamples=0, figures=False, summary=summary, keep_every_epoch=keep)
    trainer = _trainer(tmp_path, [report], max_steps=9, val_check_interval=3, limit_val_batches=1)
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule())
    assert report.val_epochs_seen == 3
    printed = _report_lines(caplog)
    assert len(printed) == lines
    if summary == "compact":
        assert all(line.count("=") == 5 for line in printed)  # n= and the four compact metrics
        assert "precision_micro" not in printed[0]
    else:
        assert "precision_micro" in printed[-1]
    written = sorted(p.name for p in (tmp_path / "artifacts" / "evaluation").iterdir())
    assert len(written) == files
    if not keep:
        assert all("_latest." in name for name in written)
        latest = (tmp_path / "artifacts" / "evaluation" / "val_metrics_latest.csv").read_text().splitlines()
        assert latest[0] == "metric,value" and float(latest[1].split(",")[1]) == pytest.approx(
            report.results["val"]["scalars"]["accuracy"], abs=1e-5)  # the last report, 6 significant digits
    caplog.clear()
    trainer.test(DigitsCNN(channels=4), datamodule=DigitsDataModule(), verbose=False)
    assert len(_report_lines(caplog)) == (0 if summary == "none" else 1)  # the test summary, once


def test_reliability_diagram_shows_the_samples_per_bin() -> None:
    from lightning_techniques.evaluation.report import plot_reliability

    probs, targets = _random_probs(300, 4, seed=0)
    bins = reliability_bins(probs, targets, n_bins=10)
    fig = plot_reliability(bins)
    diagram, counts = fig.axes
    assert diagram.get_ylabel() == "accuracy" and counts.get_ylabel() == "samples"
    assert counts.get_xlabel() == "confidence"
    annotated = [int(t.get_text()) for t in counts.texts]
    assert annotated == [int(c) for c in bins["count"].tolist() if c > 0] and sum(annotated) == 300
    assert "n=300" in diagram.get_title()


def test_permutation_importance_bars_carry_the_repeats_spread(tmp_path: Path, monkeypatch) -> None:
    from lightning_techniques._internal import artifacts as artifacts_mod
    from lightning_techniques.demo import BreastCancerDataModule, TabularMLP

    figures: dict[str, object] = {}
    original = artifacts_mod.ArtifactLogger.log_figure

    def keep(self, name, figure, step=None, close=True, latest=False):
        figures[name] = figure
        return original(self, name, figure, step, close=False, latest=latest)

    monkeypatch.setattr(artifacts_mod.ArtifactLogger, "log_figure", keep)
    L.seed_everything(0)
    imp = PermutationImportance(n_repeats=3, max_samples=64, feature_names=[f"f{i}" for i in range(30)])
    dm = BreastCancerDataModule()
    trainer = _trainer(tmp_path, [imp], max_steps=3)
    trainer.fit(TabularMLP(), datamodule=dm)
    trainer.test(trainer.lightning_module, datamodule=dm, verbose=False)
    ax = figures["importance/test_features"].axes[0]
    from matplotlib.container import BarContainer

    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert bars.errorbar is not None  # error bars from the repeats
    segments = bars.errorbar.lines[2][0].get_segments()
    std = imp.results["test"]["features_std"]
    half_widths = sorted(round(float(s[1][0] - s[0][0]) / 2, 6) for s in segments)
    order = sorted(range(30), key=lambda i: float(imp.results["test"]["features"][i]), reverse=True)
    assert half_widths == sorted(round(float(std[i]), 6) for i in order[:30])
    assert "3 permutations" in ax.get_xlabel()


def test_permutation_importance_image_map_shows_the_spread(tmp_path: Path, monkeypatch) -> None:
    from lightning_techniques._internal import artifacts as artifacts_mod

    figures: dict[str, object] = {}
    original = artifacts_mod.ArtifactLogger.log_figure

    def keep(self, name, figure, step=None, close=True, latest=False):
        figures[name] = figure
        return original(self, name, figure, step, close=False, latest=latest)

    monkeypatch.setattr(artifacts_mod.ArtifactLogger, "log_figure", keep)
    imp = PermutationImportance(n_repeats=2, max_samples=32)
    dm = DigitsDataModule()
    trainer = _trainer(tmp_path, [imp], max_steps=2)
    trainer.fit(DigitsCNN(channels=4), datamodule=dm)
    trainer.test(trainer.lightning_module, datamodule=dm, verbose=False)
    fig = figures["importance/test_features"]
    panels = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is None]
    assert [ax.get_title() for ax in panels] == ["permutation importance (test)", "std over 2 permutations"]
    shown = panels[1].images[0].get_array()
    assert np.allclose(shown, imp.results["test"]["features_std"][0].numpy())
    assert sum(getattr(ax, "_colorbar", None) is not None for ax in fig.axes) == 2
