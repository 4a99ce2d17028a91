"""The README's main job: the LightningCLI demo on real digits data, and the demo data/models themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_techniques.demo import (
    BreastCancerDataModule,
    DeepMLP,
    DigitsCNN,
    DigitsDataModule,
    TabularMLP,
    TinyTransformer,
)
from lightning_techniques.demo.cli import main
from lightning_techniques.testing import assert_exact_resume

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_command_trains_to_95_percent_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["fit", "--config", str(ROOT / "configs" / "digits.yaml"),
          f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Test accuracy:"))
    assert float(line.split(":")[1]) >= 0.95, out
    assert f"Logs: {tmp_path}" in out and "Figures and tables:" in out
    assert list(tmp_path.rglob("artifacts/lsuv/report_step*.csv")), "LSUV's report is among the artefacts"


def test_data_modules_shapes_and_splits() -> None:
    digits = DigitsDataModule()
    digits.setup("fit")
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and y.dtype == torch.long and 0.0 <= x.min() and x.max() <= 1.0
    assert len(digits.train_dataset) + len(digits.val_dataset) + len(digits.test_dataset) == 1797
    cancer = BreastCancerDataModule()
    cancer.setup("fit")
    xb, yb = next(iter(cancer.train_dataloader()))
    assert xb.shape == (32, 30) and float(xb.max()) > 100, "breast-cancer features are left unscaled"
    assert torch.bincount(cancer.train_dataset.targets).tolist()[0] < torch.bincount(cancer.train_dataset.targets)[1]


def test_models_forward_shapes() -> None:
    x = torch.rand(4, 1, 8, 8)
    for model in (DigitsCNN(), DeepMLP(depth=5), TinyTransformer()):
        assert model(x).shape == (4, 10)
    assert TabularMLP()(torch.rand(4, 30)).shape == (4, 2)
    with pytest.raises(ValueError, match="divisible"):
        TinyTransformer(d_model=30, heads=4)
    with pytest.raises(ValueError, match="optimizer='rmsprop' is not allowed"):
        DigitsCNN(optimizer="rmsprop")


def test_demo_loader_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    assert_exact_resume(lambda: DigitsCNN(channels=4), DigitsDataModule, list, tmp_path, total_steps=30, split_step=13)
