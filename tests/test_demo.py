"""The README's main job: the LightningCLI demo on real digits data, and the demo data/models themselves."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_techniques as lt
from lightning_techniques.data import EpochPermutation, ResumableDataLoader, epoch_shuffle_sampler, resumable_loader
from lightning_techniques.demo import (
    BreastCancerDataModule,
    DeepMLP,
    DigitsCNN,
    DigitsDataModule,
    TabularMLP,
    TinyTransformer,
)
from lightning_techniques.demo import data as demo_data
from lightning_techniques.demo.cli import TechniquesCLI
from lightning_techniques.demo.run_report import learning_curves_figure, lsuv_figure
from lightning_techniques.testing import assert_exact_resume

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_command_trains_to_95_percent_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = TechniquesCLI(args=["fit", "--config", str(ROOT / "configs" / "digits.yaml"),
                              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("Test accuracy:"))
    assert float(line.split(":")[1]) >= 0.95, out
    assert f"Logs: {tmp_path}" in out and "Figures and tables:" in out
    assert "torch CPU threads: 1 (torch_threads in the config)" in out
    assert "Tip:" not in out and "weights_only" not in out, out
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == len(cli.history.history) >= 5
    # the figures a user came for exist and their paths are printed
    for pattern in ("learning_curves_step*.png", "lsuv/variance_step*.png", "evaluation/test_confusion_matrix_step*.png"):
        (figure,) = tmp_path.rglob(f"artifacts/{pattern}")
        assert str(figure) in out and figure.read_bytes().startswith(b"\x89PNG")
    assert list(tmp_path.rglob("artifacts/lsuv/report_step*.csv")), "LSUV's report is among the artefacts"
    # the saved "tested" model is the model that was tested (the restored best epoch), not the last epoch
    early = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "EarlyStopping")
    assert early.restored and f"weights of epoch {early.best_epoch}, restored" in out
    tested = torch.load(cli.tested_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in cli.model.state_dict().items():
        assert torch.equal(tested[name], value), name
    last = torch.load(cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
    assert early.best_epoch < last["epoch"] and not torch.equal(last["state_dict"]["head.weight"], tested["head.weight"])
    reloaded = DigitsCNN.load_from_checkpoint(cli.tested_checkpoint, weights_only=True)
    assert torch.equal(reloaded.head.weight, cli.model.head.weight)
    # log_every_n_steps fits the 20-batch epoch: the training loss is logged several times per epoch
    (metrics,) = tmp_path.rglob("metrics.csv")
    rows = metrics.read_text().splitlines()[1:]
    assert sum(1 for row in rows if row.split(",")[0] != "") >= 3 * len(cli.history.history)


def _tiny_fit(tmp_path: Path, *extra: str) -> TechniquesCLI:
    return TechniquesCLI(args=[
        "fit", "--config", str(ROOT / "configs" / "digits.yaml"), f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_epochs=3", "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--model.init_args.channels=4", *extra,
    ])


def test_cli_writes_curves_and_tested_model_for_a_short_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = _tiny_fit(tmp_path, "--torch_threads=1")
    out = capsys.readouterr().out
    assert [int(row["epoch"]) for row in cli.history.history] == [0, 1, 2]
    assert all(0.0 <= row["train_acc"] <= 1.0 and row["val_loss"] > 0 for row in cli.history.history)
    assert cli.tested_checkpoint.is_file() and "Tested model (" in out
    assert len(list(tmp_path.rglob("learning_curves_step*.png"))) == 1


def test_cli_refuses_a_bad_thread_count(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="torch_threads must be >= 1"):
        _tiny_fit(tmp_path, "--torch_threads=0")


def test_learning_curves_mark_the_restored_epoch() -> None:
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1), "train_acc": 0.5, "val_loss": 0.5, "val_acc": 0.6}
               for e in range(4)]
    figure = learning_curves_figure(history, best_epoch=2)
    loss_ax, acc_ax = figure.axes
    for ax in (loss_ax, acc_ax):
        labels = [line.get_label() for line in ax.get_lines()]
        assert "restored (epoch 2)" in labels and {"train_" + ("loss" if ax is loss_ax else "acc")} <= set(labels)
        marker = next(line for line in ax.get_lines() if line.get_label() == "restored (epoch 2)")
        assert list(marker.get_xdata()) == [2, 2]
    report = [{"layer": "a", "variance_before": 0.1, "variance_after": 1.0},
              {"layer": "b", "variance_before": 4.0, "variance_after": 0.99}]
    (ax,) = lsuv_figure(report).axes
    heights = sorted(round(p.get_height(), 2) for p in ax.patches)
    assert heights == [0.1, 0.99, 1.0, 4.0]


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


class _OwnData(L.LightningDataModule):
    """A user's own datamodule (not the demo's): random tensors, the train loader from ``resumable_loader``."""

    def __init__(self, resumable: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.train_set = TensorDataset(torch.rand(100, 1, 8, 8, generator=g), torch.randint(0, 10, (100,), generator=g))
        self.resumable = resumable

    def train_dataloader(self) -> DataLoader:
        if self.resumable:
            return resumable_loader(self.train_set, batch_size=16, seed=3, owner=self)
        return DataLoader(self.train_set, batch_size=16, shuffle=True)


def test_resumable_loader_resumes_a_users_own_data_mid_epoch_exactly(tmp_path: Path) -> None:
    assert ResumableDataLoader is lt.ResumableDataLoader is demo_data.ResumableDataLoader  # public, demo re-exports
    assert_exact_resume(lambda: DigitsCNN(channels=4), _OwnData, list, tmp_path, total_steps=12, split_step=5,
                        trainer_kwargs={"limit_val_batches": 0})


def test_a_plain_shuffling_loader_does_not_resume_exactly(tmp_path: Path) -> None:
    """The control: what the resumable loader fixes (a plain DataLoader restarts the epoch, reshuffled)."""
    with pytest.raises(AssertionError):
        assert_exact_resume(lambda: DigitsCNN(channels=4), lambda: _OwnData(resumable=False), list, tmp_path,
                            total_steps=12, split_step=5, trainer_kwargs={"limit_val_batches": 0})


def test_resumable_loader_state_and_order() -> None:
    data = TensorDataset(torch.arange(10))
    loader = resumable_loader(data, batch_size=4, seed=1)
    assert [int(i) for b in loader for i in b[0]] == EpochPermutation(10, seed=1)(0)
    assert loader.state_dict() == {"epoch": 0, "batches": 0}  # no trainer attached yet
    loader.load_state_dict({"epoch": 0, "batches": 1})
    assert [int(i) for b in loader for i in b[0]] == EpochPermutation(10, seed=1)(0)[4:]
    # two ranks take disjoint strides of the same global order
    ranks = [epoch_shuffle_sampler(data, seed=1, trainer=SimpleNamespace(world_size=2, global_rank=r)) for r in (0, 1)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == list(range(10))
    with pytest.raises(ValueError, match="do not pass shuffle="):
        resumable_loader(data, batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="batch_size"):
        resumable_loader(data, batch_size=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        EpochPermutation(10, seed=1.5)
