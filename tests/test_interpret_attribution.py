"""Attribution loggers: saliency, Integrated Gradients, DeepLIFT, Grad-CAM, SHAP, LIME.

Meaning is tested on a synthetic task whose answer is known: 12x12 noise images, class 1 iff a bright 3x3 patch sits
at one of two fixed places. A tiny CNN trained on it for a few dozen steps must put most of the attribution mass of
class-1 samples on the patch (area fraction 9/144 = 6%).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_techniques._internal.eval_grad import describe_modes
from lightning_techniques.demo import ClassifierModule, DigitsCNN, DigitsDataModule, LabeledTensorDataset, TabularMLP
from lightning_techniques.functional import (
    completeness_report,
    deep_explainer_problems,
    deeplift,
    grad_cam,
    integrated_gradients,
    lime_attributions,
    mass_fraction,
    resolve_target_layer,
    saliency_map,
    shap_attributions,
    superpixel_mask,
)
from lightning_techniques.interpret import (
    DeepLiftLogger,
    GradCAMLogger,
    IntegratedGradientsLogger,
    LIMELogger,
    SaliencyLogger,
    SHAPLogger,
)
from lightning_techniques.interpret.attribution import select_confident_wrong, select_per_class
from lightning_techniques.testing import assert_exact_resume

SIZE = 12
PLACES = ((2, 2), (7, 7))
AREA = 9 / SIZE**2

warnings.filterwarnings("ignore", message=".*required_grads has been set automatically.*")
warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two fighting for a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------- synthetic task
def make_patch_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [n,1,12,12], y [n], patch_mask [n,12,12])``: class 1 has a bright 3x3 patch at one of two places."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, SIZE, SIZE, generator=g) * 0.5
    y = torch.randint(0, 2, (n,), generator=g)
    where = torch.randint(0, 2, (n,), generator=g)
    mask = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        r, c = PLACES[int(where[i])]
        mask[i, r : r + 3, c : c + 3] = True
        if y[i] == 1:
            x[i, 0, r : r + 3, c : c + 3] += 1.0
    return x, y, mask


class PatchData(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        x, y, _ = make_patch_data(512, seed=1)
        self.train_dataset = LabeledTensorDataset(x, y)
        vx, vy, self.val_mask = make_patch_data(64, seed=2)
        self.val_dataset = LabeledTensorDataset(vx, vy)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=64)


class PatchCNN(ClassifierModule):
    """conv-relu-conv-relu, global average pooling, linear head (the usual Grad-CAM-friendly shape)."""

    def __init__(self) -> None:
        super().__init__(lr=2e-2)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def quiet(**kwargs):
    base = dict(accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, logger=False)
    base.update(kwargs)
    return L.Trainer(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One stock-Trainer run on the patch task with every gradient logger attached (shared by several tests)."""
    L.seed_everything(0, verbose=False)
    root = tmp_path_factory.mktemp("patch")
    common = dict(selection="per_class", samples_per_class=6, max_samples=12, explain="label")
    loggers = {
        "saliency": SaliencyLogger(every_n_val_epochs=2, **common),
        "ig": IntegratedGradientsLogger(n_steps=32, every_n_val_epochs=2, **common),
        "deeplift": DeepLiftLogger(every_n_val_epochs=2, **common),
        "gradcam": GradCAMLogger(every_n_val_epochs=2, **common),
    }
    probe = ModeProbe()
    model, data = PatchCNN(), PatchData()
    model.features[0].bias.requires_grad_(False)  # a user's frozen parameter: must stay frozen
    trainer = quiet(max_epochs=4, default_root_dir=str(root), logger=CSVLogger(str(root), name="run"),
                    callbacks=[probe.before, *loggers.values(), probe.after], limit_train_batches=12)
    trainer.fit(model, datamodule=data)
    return {"trainer": trainer, "model": model, "data": data, "loggers": loggers, "probe": probe,
            "artifacts": Path(trainer.logger.log_dir) / "artifacts"}


class ModeProbe:
    """Two callbacks around the loggers: snapshot modes/flags/RNG at validation end before them, compare after."""

    def __init__(self) -> None:
        probe = self
        self.snapshots: list[tuple] = []
        self.mismatches: list[str] = []

        class Before(Callback):
            def on_validation_epoch_end(self, trainer, pl_module):
                probe.snapshots.append((describe_modes(pl_module), torch.get_rng_state(), np.random.get_state()[1].copy(),
                                        random.getstate(), torch.is_inference_mode_enabled()))

        class After(Callback):
            def on_validation_epoch_end(self, trainer, pl_module):
                modes, rng, np_rng, py_rng, inference = probe.snapshots[-1]
                if describe_modes(pl_module) != modes:
                    probe.mismatches.append("modes/flags")
                if not torch.equal(torch.get_rng_state(), rng) or not np.array_equal(np.random.get_state()[1], np_rng):
                    probe.mismatches.append("rng")
                if random.getstate() != py_rng:
                    probe.mismatches.append("python rng")
                if torch.is_inference_mode_enabled() != inference:
                    probe.mismatches.append("inference mode")

        self.before, self.after = Before(), After()


def _latest(artifacts: Path, pattern: str) -> np.ndarray:
    files = sorted(artifacts.glob(pattern))
    assert files, f"no artefact {pattern} under {artifacts}"
    return np.load(files[-1])


# ---------------------------------------------------------------------------------------------------- integration: meaning
def test_model_learned_the_patch_task(trained) -> None:
    metrics = trained["trainer"].callback_metrics
    assert float(metrics["val_acc"]) >= 0.95


@pytest.mark.parametrize("key, name, threshold", [
    ("saliency", "saliency", 0.2), ("ig", "integrated_gradients", 0.5), ("deeplift", "deeplift", 0.5),
    ("gradcam", "gradcam", 0.4),
])
def test_logged_attributions_put_mass_on_the_patch(trained, key: str, name: str, threshold: float) -> None:
    logger = trained["loggers"][key]
    data = trained["data"]
    indices = logger.indices["val"]
    attributions = torch.from_numpy(_latest(trained["artifacts"], f"{name}/val/attributions_step*.npy"))
    inputs = torch.from_numpy(_latest(trained["artifacts"], f"{name}/val/inputs_step*.npy"))
    assert torch.equal(inputs, data.val_dataset.inputs[indices])  # the logged inputs are the chosen samples
    labels = data.val_dataset.targets[indices]
    positive = labels == 1
    assert positive.sum() >= 4
    fraction = mass_fraction(attributions[positive], data.val_mask[indices][positive])
    # far above the patch's 6% area fraction, for every single sample
    assert fraction.min() > threshold, fraction


def test_ig_completeness_gap_is_small_and_logged(trained) -> None:
    logger = trained["loggers"]["ig"]
    events = [h for h in logger.history if h["stage"] == "val"]
    assert [e["step"] for e in events] == [24, 48]  # validation runs 2 and 4 of 4 (12 steps each; every_n_val_epochs=2)
    assert events[-1]["completeness_relative_gap_max"] < 0.02
    table = sorted(trained["artifacts"].glob("integrated_gradients/val/completeness_step*.csv"))
    assert len(table) == 2
    metrics = (Path(trained["trainer"].logger.log_dir) / "metrics.csv").read_text()
    assert "integrated_gradients/val/completeness_gap_max" in metrics


def test_loggers_restore_modes_flags_rng_and_write_overlays(trained) -> None:
    probe = trained["probe"]
    assert len(probe.snapshots) == 4 and probe.mismatches == []
    for name in ("saliency", "integrated_gradients", "deeplift", "gradcam"):
        assert len(sorted(trained["artifacts"].glob(f"{name}/val/overlay_step*.png"))) == 2
        assert len(sorted(trained["artifacts"].glob(f"{name}/val/samples_step*.csv"))) == 2
    assert trained["loggers"]["gradcam"].resolved_layer == "features.2"  # last Conv2d found automatically


def test_test_end_logging_uses_the_test_set(trained) -> None:
    ig = IntegratedGradientsLogger(n_steps=16, max_samples=4)
    trainer = quiet(callbacks=[ig], default_root_dir=str(trained["artifacts"].parent / "test_run"))
    trainer.test(trained["model"], datamodule=trained["data"], verbose=False)
    assert ig.indices["val"] is None and len(ig.indices["test"]) == 2  # one per class (2 classes)
    assert [h["stage"] for h in ig.history] == ["test"]
    assert list((trained["artifacts"].parent / "test_run" / "artifacts" / "integrated_gradients" / "test").glob("*.npy"))
    # SHAP in a test-only run takes its background from the datamodule's training set
    shap_logger = SHAPLogger(background_size=8, max_samples=2, nsamples=16)
    quiet(callbacks=[shap_logger], default_root_dir=str(trained["artifacts"].parent / "test_shap")).test(
        trained["model"], datamodule=trained["data"], verbose=False)
    assert len(shap_logger.indices["background"]) == 8 and shap_logger.history[0]["explainer"] == "gradient"


# ---------------------------------------------------------------------------------------------------- unit: cores
def _linear(seed: int = 0, n_in: int = 5, n_out: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out)


def test_saliency_and_ig_on_a_linear_model_match_the_formulas() -> None:
    model = _linear()
    x = torch.randn(4, 5)
    target = torch.tensor([0, 1, 2, 1])
    w = model.weight.detach()[target]
    with torch.inference_mode():  # as inside Lightning's evaluation loop
        x_inf = x.clone()
        sal = saliency_map(model, x_inf, target)
        ig, delta = integrated_gradients(model, x_inf, target, baseline=0.5, n_steps=8)
        dl, dl_delta = deeplift(model, x_inf, target, baseline=0.5)
    torch.testing.assert_close(sal, w.abs())
    torch.testing.assert_close(ig, w * (x - 0.5))  # IG of a linear function is exact: w * (x - x')
    torch.testing.assert_close(dl, w * (x - 0.5))
    assert delta.abs().max() < 1e-5 and dl_delta.abs().max() < 1e-5
    assert all(p.requires_grad for p in model.parameters()) and model.training


def test_ig_completeness_on_a_relu_network_and_report_agrees_with_captum() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(8, 6)
    target = torch.arange(8) % 3
    attributions, delta = integrated_gradients(model, x, target, n_steps=200)
    report = completeness_report(model, x, attributions, target)
    torch.testing.assert_close(report["gap"], delta.abs().double().cpu(), atol=1e-5, rtol=1e-3)
    assert float(report["gap"].max() / report["output_difference"].abs().mean()) < 0.01
    # DeepLIFT's summation-to-delta is exact (up to float error) on nn.ReLU networks
    dl, dl_delta = deeplift(model, x, target)
    assert float(completeness_report(model, x, dl, target)["gap"].max()) < 1e-4


def test_grad_cam_matches_the_paper_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    x = torch.randn(2, 1, 6, 6)
    target = torch.tensor([2, 0])
    name, layer = resolve_target_layer(model, None)
    assert name == "2"
    cam = grad_cam(model, layer, x, target, upsample=False)
    # by hand: A = layer output, alpha_k = mean_ij dy_c/dA_kij, cam = ReLU(sum_k alpha_k A_k)
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    out = model(x)
    handle.remove()
    grads = torch.autograd.grad(out.gather(1, target[:, None]).sum(), acts[0])[0]
    expected = F.relu((grads.mean(dim=(2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
    torch.testing.assert_close(cam, expected.detach())
    up = grad_cam(model, layer, x, target, upsample=True, interpolate_mode="nearest")
    assert up.shape == (2, 1, 6, 6)


def test_shap_on_a_linear_model_matches_closed_form() -> None:
    model = _linear()
    x = torch.randn(4, 5)
    background = torch.randn(16, 5)
    target = torch.tensor([0, 1, 2, 1])
    w = model.weight.detach()[target]
    deep, used = shap_attributions(model, x, target, background, explainer="deep")
    assert used == "deep"
    torch.testing.assert_close(deep, w * (x - background.mean(0)), atol=1e-5, rtol=1e-4)
    # expected gradients with one background sample: exactly w * (x - b)
    grad, used = shap_attributions(model, x, target, background[:1], explainer="gradient", nsamples=20)
    assert used == "gradient"
    torch.testing.assert_close(grad, w * (x - background[:1]), atol=1e-5, rtol=1e-4)


class ReusedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(5, 8), nn.Linear(8, 3), nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.act(self.a(x)) - 0.1))


class FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = nn.Linear(5, 32), nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def _params_and_hooks(model: nn.Module) -> tuple:
    return ([n for n, _ in model.named_parameters()],
            [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()])


def test_deep_explainer_problems_and_fallback() -> None:
    inplace = nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    assert any("in-place" in p for p in deep_explainer_problems(inplace))
    reused = ReusedReLU()
    x = torch.randn(4, 5)
    assert any("reused" in p for p in deep_explainer_problems(reused, x))
    assert deep_explainer_problems(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), x) == []
    with pytest.raises(ValueError, match="DeepExplainer cannot explain.*reused"):
        shap_attributions(reused, x, 0, torch.randn(8, 5), explainer="deep")
    with pytest.warns(UserWarning, match="falling back to GradientExplainer"):
        values, used = shap_attributions(reused, x, 0, torch.randn(8, 5), explainer="auto", nsamples=16)
    assert used == "gradient" and values.shape == x.shape
    # functional ReLU is invisible in the module tree: shap's additivity check catches it
    functional = FunctionalReLU()
    before = _params_and_hooks(functional)
    background = torch.randn(16, 5) * 3
    with pytest.raises(ValueError, match="additivity"):
        shap_attributions(functional, x * 3, [0, 1, 2, 0], background, explainer="deep")
    assert _params_and_hooks(functional) == before  # nothing left behind by the failed attempt
    with pytest.warns(UserWarning, match="additivity"):
        _, used = shap_attributions(functional, x * 3, [0, 1, 2, 0], background, explainer="auto", nsamples=16)
    assert used == "gradient"


def test_lime_recovers_the_contributions_of_a_linear_model() -> None:
    model = _linear(n_in=6)
    x = torch.randn(2, 6) + 2.0
    target = torch.tensor([0, 2])
    background = torch.randn(4, 6)
    rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    values = lime_attributions(model, x, target, n_samples=400, seed=0)
    shap_attributions(model, x, target, background, explainer="gradient", nsamples=8, seed=3)
    # stochastic cores draw from a private seeded stream: the caller's RNG state is untouched
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    torch.testing.assert_close(values, lime_attributions(model, x, target, n_samples=400, seed=0))  # seeded
    # switching feature j off (baseline 0) removes w_j x_j: the local linear model's coefficient is w_j x_j
    torch.testing.assert_close(values, model.weight.detach()[target] * x, atol=1e-4, rtol=1e-4)
    mask = superpixel_mask((1, 4, 6), 2)
    assert mask.shape == (1, 4, 6) and mask.max() == 5 and mask[0, 1, 3] == 1 and mask[0, 3, 0] == 3


def test_lime_and_shap_find_the_patch(trained) -> None:
    model, data = trained["model"], trained["data"]
    rows = torch.nonzero(data.val_dataset.targets == 1)[:3, 0]
    x, mask = data.val_dataset.inputs[rows], data.val_mask[rows]
    with torch.inference_mode():
        lime = lime_attributions(model, x, 1, superpixel_size=1, n_samples=200)
        sparse = lime_attributions(model, x[:1], 1, superpixel_size=1, n_samples=200, alpha=0.01)
        shap_values, used = shap_attributions(model, x, 1, data.train_dataset.inputs[:32], explainer="auto")
    assert used == "deep"  # PatchCNN is built from nn.ReLU / pooling / linear layers
    assert mass_fraction(lime, mask).min() > 0.4 and mass_fraction(sparse, mask[:1]).min() > 0.4
    assert mass_fraction(shap_values, mask).min() > 0.4


def test_sample_selection_rules() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    picked = select_per_class(labels, per_class=2, max_samples=10, seed=0)
    assert len(picked) == 6 and [int(labels[i]) for i in picked] == [0, 0, 1, 1, 2, 2]
    assert picked == select_per_class(labels, 2, 10, seed=0)  # seeded
    assert len(select_per_class(labels, 2, 4, seed=0)) == 4
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.45, 0.55]])
    truth = torch.tensor([1, 0, 0, 0])
    # wrong: 0 (p=0.9), 1 (p=0.8), 3 (p=0.55); then the correct one with the smallest margin
    assert select_confident_wrong(probs, truth, 4) == [0, 1, 3, 2]


# ---------------------------------------------------------------------------------------------------- loggers on the demo
def test_shap_and_lime_loggers_on_digits(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    shap_logger = SHAPLogger(explainer="auto", background_size=16, max_samples=3, every_n_val_epochs=1)
    lime_logger = LIMELogger(superpixel_size=2, n_samples=50, max_samples=3, selection="confident_wrong",
                             every_n_val_epochs=1)
    tensorboard = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = quiet(max_epochs=1, limit_train_batches=5, limit_val_batches=1, default_root_dir=str(tmp_path),
                    callbacks=[shap_logger, lime_logger], logger=tensorboard)
    trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule())
    assert shap_logger.explainer_used == "deep" and len(shap_logger.indices["background"]) == 16
    assert len(lime_logger.indices["val"]) == 3
    artefacts = Path(tensorboard.log_dir) / "artifacts"
    for name in ("shap", "lime"):
        arr = np.load(next((artefacts / name / "val").glob("attributions_step*.npy")))
        assert arr.shape == (3, 1, 8, 8) and np.abs(arr).sum() > 0, name
    # the 3 "confidently wrong" samples are misclassified (an under-trained model gets plenty wrong)
    import csv

    rows = list(csv.DictReader(next((artefacts / "lime" / "val").glob("samples_step*.csv")).open()))
    assert all(r["label"] != r["prediction"] for r in rows)
    # the overlays also reached the attached logger (TensorBoard images)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"shap/val/overlay", "lime/val/overlay"} <= set(events.Tags()["images"])


def test_tabular_inputs_get_a_feature_map(tmp_path) -> None:
    from lightning_techniques.demo import BreastCancerDataModule

    ig = IntegratedGradientsLogger(n_steps=16, max_samples=2, every_n_val_epochs=1)
    trainer = quiet(max_epochs=1, limit_train_batches=2, default_root_dir=str(tmp_path), callbacks=[ig])
    trainer.fit(TabularMLP(), datamodule=BreastCancerDataModule())
    assert np.load(next((tmp_path / "artifacts" / "integrated_gradients" / "val").glob("attributions_*.npy"))).shape == (2, 30)
    assert list((tmp_path / "artifacts" / "integrated_gradients" / "val").glob("overlay_*.png"))


def test_exact_resume_keeps_samples_and_training(tmp_path) -> None:
    def callbacks():
        return [IntegratedGradientsLogger(n_steps=8, max_samples=3, selection="confident_wrong", every_n_val_epochs=1),
                GradCAMLogger(max_samples=3, every_n_val_epochs=2), LIMELogger(n_samples=20, max_samples=2, every_n_val_epochs=1),
                DeepLiftLogger(max_samples=2, every_n_val_epochs=1),
                SHAPLogger(explainer="gradient", background_size=8, max_samples=2, every_n_val_epochs=2),
                SaliencyLogger(max_samples=2, every_n_val_epochs=1)]

    straight = assert_exact_resume(lambda: DigitsCNN(channels=8), lambda: DigitsDataModule(), callbacks, tmp_path,
                                   total_steps=8, split_step=3,
                                   trainer_kwargs={"val_check_interval": 2, "limit_val_batches": 1})
    ig, cam, _, deeplift, shap, saliency = straight["callbacks"]
    assert ig.validation_runs == 4 and len(ig.history) == 4 and len(cam.history) == 2
    assert len(deeplift.history) == 4 and len(shap.history) == 2 and len(saliency.history) == 4


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("cls, kwargs, match", [
    (SaliencyLogger, {"every_n_val_epochs": 0}, "every_n_val_epochs"),
    (SaliencyLogger, {"selection": "random"}, "selection"),
    (IntegratedGradientsLogger, {"n_steps": 0}, "n_steps"),
    (IntegratedGradientsLogger, {"explain": "logit"}, "explain"),
    (DeepLiftLogger, {"completeness_tolerance": -1.0}, "completeness_tolerance"),
    (GradCAMLogger, {"interpolate_mode": "cubic"}, "interpolate_mode"),
    (GradCAMLogger, {"target_layer": ""}, "target_layer"),
    (SHAPLogger, {"explainer": "kernel"}, "explainer"),
    (SHAPLogger, {"background_size": 0}, "background_size"),
    (LIMELogger, {"superpixel_size": 1.5}, "superpixel_size"),
    (LIMELogger, {"alpha": -0.1}, "alpha"),
    (LIMELogger, {"max_samples": -2}, "max_samples"),
])
def test_bad_arguments_fail_in_init(cls, kwargs, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        cls(**kwargs)


def _fit_fails(callback, module, match: str, tmp_path) -> None:
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet(max_steps=2, default_root_dir=str(tmp_path), callbacks=[callback])
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing half-applied


def test_misuse_is_detected_in_setup(tmp_path) -> None:
    _fit_fails(GradCAMLogger(target_layer="features.9"), DigitsCNN(channels=4),
               r"target_layer='features.9'.*conv layers: \['features.0', 'features.2', 'features.5'\]", tmp_path)
    _fit_fails(GradCAMLogger(), TabularMLP(in_features=64, num_classes=10), "no nn.Conv2d", tmp_path)
    inplace = DigitsCNN(channels=4)
    inplace.features[1] = nn.ReLU(inplace=True)
    _fit_fails(SHAPLogger(explainer="deep"), inplace, "in-place", tmp_path)
    reused = DigitsCNN(channels=4)
    reused.features[3] = reused.features[1]  # one nn.ReLU object used twice
    _fit_fails(SHAPLogger(explainer="deep"), reused, "reused", tmp_path)
    _fit_fails(DeepLiftLogger(), inplace, "in-place", tmp_path)


# ---------------------------------------------------------------------------------------------------- DDP
@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_rank_zero_only(tmp_path) -> None:
    from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

    script = Path(__file__).parent / "ddp" / "ddp_attrib.py"
    results = run_ddp_script(script, tmp_path)
    assert_ranks_agree(results, keys=["weights", "validation_runs", "finished"])
    rank0, rank1 = results
    names = ("ig", "gradcam", "shap", "saliency", "deeplift", "lime")
    assert rank0["events"] == dict.fromkeys(names, 2) and rank1["events"] == dict.fromkeys(names, 0)
    assert rank0["artifact_files"] > 0 and rank0["completeness_gap"] > 0.0  # rank 0 computed and wrote them
    assert rank1["validation_runs"] == 2


def test_iterable_validation_data_is_refused_clearly(tmp_path) -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(8):
                yield torch.rand(1, 8, 8, generator=g), torch.tensor(1)

    class StreamData(DigitsDataModule):
        def val_dataloader(self):
            return DataLoader(Stream(), batch_size=4)

    trainer = quiet(max_epochs=1, limit_train_batches=1, default_root_dir=str(tmp_path),
                    callbacks=[SaliencyLogger(every_n_val_epochs=1)])
    with pytest.raises(TypeError, match="map-style val dataset"):
        trainer.fit(DigitsCNN(channels=4), datamodule=StreamData())


@pytest.mark.gpu
def test_loggers_find_the_patch_on_a_gpu(tmp_path) -> None:
    L.seed_everything(0, verbose=False)
    common = dict(selection="per_class", samples_per_class=4, max_samples=8, explain="label", every_n_val_epochs=4)
    loggers = [IntegratedGradientsLogger(**common), GradCAMLogger(**common), SHAPLogger(explainer="auto", **common),
               LIMELogger(superpixel_size=1, n_samples=300, **common)]
    data = PatchData()
    trainer = quiet(accelerator="gpu", max_epochs=4, limit_train_batches=12, default_root_dir=str(tmp_path),
                    callbacks=loggers)
    trainer.fit(PatchCNN(), datamodule=data)
    for logger in loggers:
        indices = logger.indices["val"]
        positive = data.val_dataset.targets[indices] == 1
        fraction = mass_fraction(logger.last["attributions"][positive], data.val_mask[indices][positive])
        assert fraction.min() > 0.3, (logger.name, fraction)
