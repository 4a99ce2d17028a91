"""DeepLIFT's summation-to-delta where activations feed each other directly (``nn.ReLU`` -> ``nn.MaxPool2d``), and
the per-sample completeness report with the remedy that fits the method."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.interpret import DeepLiftLogger, IntegratedGradientsLogger, completeness_report, deeplift

warnings.filterwarnings("ignore", message=".*Setting forward, backward hooks.*")


def _conv(i: int, o: int) -> nn.Conv2d:
    return nn.Conv2d(i, o, 3, padding=1)


CHAINS = {
    # Captum 0.9 alone: per-sample relative gaps of 0.2-0.4 on each of these
    "relu->maxpool": lambda: [_conv(1, 8), nn.ReLU(), _conv(8, 8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(128, 10)],
    "maxpool->relu": lambda: [_conv(1, 8), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(128, 10)],
    "relu->sigmoid": lambda: [nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Sigmoid(), nn.Linear(32, 10)],
}


def _relative_gaps(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    target = model(x).argmax(dim=1)
    attributions, _ = deeplift(model, x, target)
    report = completeness_report(model, x, attributions, target)
    return report["gap"] / report["output_difference"].abs()


@pytest.mark.parametrize("chain", list(CHAINS))
def test_summation_to_delta_holds_for_chained_activation_modules(chain: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*CHAINS[chain]()).eval()
    x = torch.rand(10, 1, 8, 8)
    assert _relative_gaps(model, x).max() < 1e-3
    # nothing left on the modules; the forward is unchanged
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_demo_cnn_every_sample_sums_to_delta() -> None:
    torch.manual_seed(0)
    data = DigitsDataModule()
    data.setup("fit")
    model = DigitsCNN(channels=8).eval()  # conv-ReLU-conv-ReLU-MaxPool2d-conv-ReLU
    gaps = _relative_gaps(model, data.val_dataset.inputs[:10])
    assert gaps.max() < 1e-3, gaps  # before: 5 of 10 samples above 5%, up to 41%


class FunctionalCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.head = _conv(1, 8), _conv(8, 8), nn.Linear(8 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.b(F.relu(self.a(x)))), 2)
        return self.head(h.flatten(1))


def test_logger_reports_the_worst_sample_and_the_deeplift_remedy() -> None:
    x = torch.rand(8, 1, 8, 8) * 3
    target = torch.arange(8) % 10
    functional = FunctionalCNN().eval()
    logger = DeepLiftLogger()
    with pytest.warns(UserWarning, match=r"fails for \d+ of 8 samples \(worst: sample \d+") as record:
        attributions, summary = logger.attribute(functional, x, target, trainer=None)
    message = str(record[0].message)
    assert "F.relu" in message and "IntegratedGradientsLogger" in message and "raise n_steps" not in message
    assert summary["completeness_samples_over_tolerance"] >= 1
    assert summary["completeness_sample_relative_gap_max"] > logger.completeness_tolerance
    per_sample = summary["tables"]["completeness"]["sample_relative_gap"]
    assert len(per_sample) == 8 and max(per_sample) == summary["completeness_sample_relative_gap_max"]
    # the same model in modules: no warning, every sample within tolerance
    modules = nn.Sequential(functional.a, nn.ReLU(), functional.b, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                            functional.head).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _, summary = DeepLiftLogger().attribute(modules, x, target, trainer=None)
    assert summary["completeness_samples_over_tolerance"] == 0
    # IG's remedy is more steps
    with pytest.warns(UserWarning, match=r"raise n_steps \(now 2\)"):
        IntegratedGradientsLogger(n_steps=2, completeness_tolerance=1e-6).attribute(modules, x, target, trainer=None)
