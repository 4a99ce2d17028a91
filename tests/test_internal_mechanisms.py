"""The shared mechanisms of ARCHITECTURE.md section 4, each tested on its own on a stock Trainer."""

from __future__ import annotations

import copy
import zlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques._internal import (
    ArtifactLogger,
    CriterionHandle,
    SamplerSteering,
    SteeredSampler,
    add_batch_transform,
    add_loss_term,
    agree_all,
    agree_any,
    all_reduce_sum,
    broadcast_object,
    find_criterion,
    get_inputs,
    get_targets,
    gradients_enabled,
    registered_loss_terms,
    set_inputs,
    set_targets,
    usable_tensor,
)
from lightning_techniques._internal.artifacts import encode_png
from lightning_techniques._internal.validation import check_choice, check_number, check_probability
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.testing import assert_exact_resume


class Linear(L.LightningModule):
    """y = w x regression with an MSE criterion attribute, SGD without momentum (easy to compute by hand)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
        self.criterion = nn.MSELoss()
        self.seen_train: list[torch.Tensor] = []
        self.seen_val: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.seen_train.append(x.detach().clone())
        return self.criterion(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_val.append(batch[0].detach().clone())

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.seen_val.append(batch[0].detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 4, batch_size: int = 4) -> DataLoader:
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) / 10
    y = torch.ones(n, 1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0)
    base.update(kwargs)
    return L.Trainer(**base)


# ------------------------------------------------------------------ batch access
def test_batch_access_tuple_dict_tensor() -> None:
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert get_inputs((x, y)) is x and get_targets((x, y)) is y
    assert get_inputs({"x": x, "y": y}) is x and get_targets({"label": y, "image": x}) is y
    assert get_inputs(x) is x
    new = set_inputs((x, y), x + 1)
    assert isinstance(new, tuple) and torch.equal(new[0], x + 1) and new[1] is y
    assert torch.equal(set_targets({"x": x, "y": y}, y * 2)["y"], y * 2)
    with pytest.raises(KeyError, match="tried"):
        get_inputs({"foo": x})
    with pytest.raises(KeyError, match="input_key='nope'"):
        get_inputs({"x": x}, input_key="nope")


# ------------------------------------------------------------------ loss terms
class AddL2(Callback):
    def __init__(self, lam: float) -> None:
        self.lam = lam

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.handle = add_loss_term(pl_module, "l2", lambda m, b, i, loss: self.lam * (m.layer.weight**2).sum())

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.handle.remove()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_loss_term_reaches_gradients_and_is_undone(accumulate: int) -> None:
    lam = 0.3
    model = Linear()
    w0 = model.layer.weight.detach().clone()
    loader = _loader(n=4, batch_size=2)
    trainer = _trainer(max_steps=1, accumulate_grad_batches=accumulate, limit_val_batches=0, callbacks=[AddL2(lam)])
    trainer.fit(model, train_dataloaders=loader)
    # by hand: mean over the micro-batches of (MSE + lam * |w|^2), one SGD step of lr 0.1
    w = w0.clone().requires_grad_(True)
    total = 0.0
    for xb, yb in list(loader)[:accumulate]:
        total = total + (nn.functional.mse_loss(xb @ w.T, yb) + lam * (w**2).sum()) / accumulate
    total.backward()
    expected = w0 - 0.1 * w.grad
    assert torch.allclose(model.layer.weight.detach(), expected, atol=1e-6)
    assert "training_step" not in model.__dict__, "the wrapper must be removed at teardown"
    assert registered_loss_terms(model) == []
    assert "loss_terms/l2" in trainer.callback_metrics


def test_loss_term_refuses_manual_optimisation_and_duplicates() -> None:
    model = Linear()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="automatic optimisation"):
        add_loss_term(model, "x", lambda *a: torch.tensor(0.0))
    model.automatic_optimization = True
    handle = add_loss_term(model, "x", lambda *a: torch.tensor(0.0))
    with pytest.raises(ValueError, match="already registered"):
        add_loss_term(model, "x", lambda *a: torch.tensor(0.0))
    handle.remove()
    assert "training_step" not in model.__dict__


# ------------------------------------------------------------------ criterion
def test_criterion_set_replace_restore_keeps_state_dict_clean() -> None:
    model = DigitsCNN()
    keys = set(model.state_dict())
    handle = CriterionHandle(model)
    assert handle.name == "criterion"
    handle.set(weight=torch.arange(1.0, 11.0), label_smoothing=0.1)
    assert torch.equal(model.criterion.weight, torch.arange(1.0, 11.0))
    assert model.criterion.label_smoothing == 0.1
    assert set(model.state_dict()) == keys, "criterion options must not enter the module's state_dict"
    fresh = DigitsCNN()
    fresh.load_state_dict(model.state_dict())  # strict load into the plain module still works
    with pytest.raises(ValueError, match="no option"):
        handle.set(gamma=2.0)
    handle.replace(nn.NLLLoss())
    assert isinstance(model.criterion, nn.NLLLoss)
    handle.restore()
    assert isinstance(model.criterion, nn.CrossEntropyLoss)
    assert model.criterion.weight is None and model.criterion.label_smoothing == 0.0
    assert set(model.state_dict()) == keys


def test_criterion_errors_name_what_exists() -> None:
    module = nn.Module()
    module.body = nn.Linear(2, 2)
    with pytest.raises(AttributeError, match="holds no loss module"):
        find_criterion(module)
    module.a, module.b = nn.MSELoss(), nn.L1Loss()
    with pytest.raises(AttributeError, match="several loss modules"):
        find_criterion(module)
    with pytest.raises(AttributeError, match="criterion_attr='loss_fn'"):
        find_criterion(module, "loss_fn")
    assert find_criterion(module, "b")[1] is module.b


# ------------------------------------------------------------------ sampler steering
def test_steered_sampler_splits_the_global_order_disjointly() -> None:
    dataset = list(range(10))
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    shards = [list(SteeredSampler(dataset, lambda e: order, 10, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert shards[0] == [9, 6, 3, 0] and shards[1] == [8, 5, 2, 9] and shards[2] == [7, 4, 1, 8]
    sampler = SteeredSampler(dataset, lambda e: order, 10)
    sampler.resume_at(0, 3)
    assert list(sampler) == order[3:] and len(sampler) == 10
    assert list(sampler) == order, "the skip applies to one iteration only"
    with pytest.raises(RuntimeError, match="epoch_size=10"):
        list(SteeredSampler(dataset, lambda e: order[:5], 10))


class ReverseOrder(Callback):
    """A minimal technique on the sampler mechanism: epoch e yields indices in a seeded permutation of e."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        def factory(dataset: Any, loader: Any):
            n = len(dataset)
            return (lambda epoch: torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch)).tolist()), n

        self.steering = SamplerSteering(trainer, factory, owner="ReverseOrder")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.seen.append(batch[1].tolist())

    def state_dict(self) -> dict[str, Any]:
        return {"steering": self.steering.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steering.load_state_dict(state_dict["steering"])

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.steering.remove()


class IndexData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        x = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, torch.arange(24)), batch_size=4, shuffle=True)


class IndexModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_sampler_steering_yields_the_plan_and_resumes_mid_epoch(tmp_path: Path) -> None:
    callback = ReverseOrder()
    _trainer(max_epochs=2, callbacks=[callback]).fit(IndexModel(), datamodule=IndexData())
    for epoch in range(2):
        expected = torch.randperm(24, generator=torch.Generator().manual_seed(100 + epoch)).tolist()
        got = [i for batch in callback.seen[epoch * 6 : (epoch + 1) * 6] for i in batch]
        assert got == expected, "the loader must yield exactly the plan's order (shuffle=True was replaced)"
    # mid-epoch split (step 9 of 12): the second half must continue the same permutation at the same position
    result = assert_exact_resume(IndexModel, IndexData, lambda: [ReverseOrder()], tmp_path, total_steps=12, split_step=9)
    straight_seen = result["callbacks"][0].seen
    assert len(straight_seen) == 12


def test_two_sampler_owners_conflict() -> None:
    trainer = _trainer(max_steps=1)
    trainer.fit_loop._data_source = type("S", (), {"dataloader": lambda self: None})()
    first = SamplerSteering(trainer, lambda d, loader: (lambda e: [], 0), owner="A")
    with pytest.raises(RuntimeError, match="A both want"):
        SamplerSteering(trainer, lambda d, loader: (lambda e: [], 0), owner="B")
    first.remove()


# ------------------------------------------------------------------ batch transforms
class PlusOne(Callback):
    def __init__(self, stages: tuple[str, ...]) -> None:
        self.stages = stages

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.handle = add_batch_transform(
            trainer, pl_module, "plus_one", lambda b, s: set_inputs(b, get_inputs(b) + 1), stages=self.stages
        )

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.handle.remove()


@pytest.mark.parametrize("with_datamodule", [False, True])
def test_batch_transform_applies_to_chosen_stages_only(with_datamodule: bool) -> None:
    model = Linear()
    loader = _loader()
    trainer = _trainer(max_steps=1, callbacks=[PlusOne(("train",))], limit_val_batches=1)
    if with_datamodule:
        datamodule = L.LightningDataModule.from_datasets(train_dataset=loader.dataset, val_dataset=loader.dataset,
                                                         batch_size=4)
        trainer.fit(model, datamodule=datamodule)
        owner = datamodule
    else:
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
        owner = model
    raw = next(iter(loader))[0]
    assert torch.equal(model.seen_train[0].flatten().sort().values, (raw + 1).flatten().sort().values)
    assert torch.equal(model.seen_val[0].flatten().sort().values, raw.flatten().sort().values), "validation must be untouched when only 'train' is registered"
    assert "on_after_batch_transfer" not in owner.__dict__


def test_batch_transform_at_eval_and_bad_stage() -> None:
    model = Linear()
    loader = _loader()
    trainer = _trainer(max_steps=1, callbacks=[PlusOne(("train", "validate"))], limit_val_batches=1)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert torch.equal(model.seen_val[0], next(iter(loader))[0] + 1)
    with pytest.raises(ValueError, match="stages"):
        add_batch_transform(trainer, model, "x", lambda b, s: b, stages=("training",))


# ------------------------------------------------------------------ gradients inside evaluation
class GradInValidation(Callback):
    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        assert torch.is_inference_mode_enabled()
        pl_module.train()  # a user who trains with dropout etc.: mode must come back
        before = {n: p.requires_grad for n, p in pl_module.named_parameters()}
        with gradients_enabled(pl_module):
            x = usable_tensor(batch[0]).requires_grad_(True)
            pl_module(x).sum().backward()
            self.grad = x.grad.clone()
            assert not pl_module.training
        assert pl_module.training
        assert before == {n: p.requires_grad for n, p in pl_module.named_parameters()}
        assert all(p.grad is None for p in pl_module.parameters()), "no parameter gradient may be produced"


def test_gradients_enabled_inside_inference_mode_validation() -> None:
    model = Linear()
    callback = GradInValidation()
    trainer = _trainer(max_steps=0, callbacks=[callback], limit_val_batches=1)
    trainer.validate(model, dataloaders=_loader(), verbose=False)
    assert torch.allclose(callback.grad, model.layer.weight.detach().expand_as(callback.grad))


def test_gradients_enabled_tolerates_deterministic_mode_and_restores_it() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveMaxPool2d(2))
    torch.use_deterministic_algorithms(True)
    try:
        with gradients_enabled(model):
            assert torch.is_deterministic_algorithms_warn_only_enabled()
            x = torch.randn(1, 1, 6, 6, requires_grad=True)
            model(x).sum().backward()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


# ------------------------------------------------------------------ evaluation-stage routing
def test_evaluation_callback_routes_counts_and_releases() -> None:
    from lightning_techniques._internal.eval_stages import EvaluationCallback

    class Recorder(EvaluationCallback):
        every_n_val_epochs = 2

        def __init__(self) -> None:
            super().__init__()
            self.events: list[tuple[str, ...]] = []

        def _start(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.events.append(("start", stage, str(trainer.sanity_checking), str(self.validation_due(trainer))))

        def _batch_end(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int,
                       stage: str) -> None:
            self.events.append(("batch", stage))

        def _finish(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.events.append(("finish", stage, str(self.val_epochs_seen)))

        def _stop(self) -> None:
            self.events.append(("stop",))

    recorder = Recorder()
    loader = _loader()
    trainer = _trainer(max_epochs=3, callbacks=[recorder], num_sanity_val_steps=1, limit_val_batches=1)
    trainer.fit(Linear(), train_dataloaders=loader, val_dataloaders=loader)
    trainer.test(Linear(), dataloaders=loader, verbose=False)
    starts = [e for e in recorder.events if e[0] == "start"]
    assert starts[0][:3] == ("start", "validate", "True") and recorder.events[2] == ("stop",), "sanity: released"
    assert [e[3] for e in starts[1:4]] == ["False", "True", "False"], "every 2nd validation epoch is due"
    assert [e for e in recorder.events if e[0] == "finish"] == [
        ("finish", "validate", "1"), ("finish", "validate", "2"), ("finish", "validate", "3"), ("finish", "test", "3")
    ]
    assert recorder.state_dict() == {"val_epochs_seen": 3}


# ------------------------------------------------------------------ artefacts
def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    idat = data[data.index(b"IDAT") + 4 :]
    assert zlib.decompress(idat[: int.from_bytes(data[data.index(b"IDAT") - 4 : data.index(b"IDAT")], "big")])
    return width, height


def test_png_encoder_roundtrip_with_matplotlib(tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    image = np.zeros((5, 7, 3), dtype=np.uint8)
    image[1, 2] = [255, 0, 0]
    path = tmp_path / "x.png"
    path.write_bytes(encode_png(image))
    decoded = (mpimg.imread(path) * 255).round().astype(np.uint8)
    assert decoded.shape[:2] == (5, 7) and decoded[1, 2, :3].tolist() == [255, 0, 0] and decoded[0, 0, :3].sum() == 0


def test_artifact_logger_writes_files_and_tensorboard(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer = _trainer(max_steps=1, logger=[CSVLogger(tmp_path, name="csv"), tb])
    trainer.fit(Linear(), train_dataloaders=_loader())
    logger = ArtifactLogger(trainer)
    image_path = logger.log_image("maps/sample", torch.rand(1, 8, 8), step=3)
    table_path = logger.log_table("report", [{"metric": "acc", "value": 0.5}, {"metric": "f1", "value": 0.25}])
    array_path = logger.log_array("raw", torch.arange(6).reshape(2, 3))
    assert image_path.parent == Path(trainer.loggers[0].log_dir) / "artifacts" / "maps"
    assert _png_size(image_path.read_bytes()) == (8, 8)
    assert table_path.read_text().splitlines() == ["metric,value", "acc,0.5", "f1,0.25"]
    assert table_path.with_suffix(".md").read_text().startswith("| metric | value |")
    assert np.load(array_path).tolist() == [[0, 1, 2], [3, 4, 5]]
    tb.experiment.flush()
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))
    with pytest.raises(ValueError, match="image must be"):
        logger.log_image("bad", np.zeros((2, 3, 4, 5)))


def test_artifact_dir_without_logger(tmp_path: Path) -> None:
    trainer = _trainer(max_steps=1, default_root_dir=str(tmp_path))
    path = ArtifactLogger(trainer).log_text("notes", "hello")
    assert path == tmp_path / "artifacts" / "notes_step0000000.txt" and path.read_text() == "hello"


# ------------------------------------------------------------------ distributed helpers (single process)
def test_distributed_helpers_are_identity_in_one_process() -> None:
    trainer = _trainer()
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(all_reduce_sum(trainer.strategy, t), t)
    assert broadcast_object(trainer.strategy, {"a": 1}) == {"a": 1}
    assert agree_any(trainer.strategy, True) and not agree_all(trainer.strategy, False)


# ------------------------------------------------------------------ validation helpers
def test_validation_messages_name_argument_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"mode='median' is not allowed; choose one of \['min', 'max'\]"):
        check_choice("mode", "median", ["min", "max"])
    with pytest.raises(ValueError, match=r"p must be a number in \[0.0, 1.0\]"):
        check_probability("p", 1.5)
    with pytest.raises(TypeError, match="k must be an integer"):
        check_number("k", 1.5, integer=True)
    with pytest.raises(TypeError, match="x must be a number"):
        check_number("x", True)


def test_demo_datamodule_deepcopy_and_split_sizes() -> None:
    dm = DigitsDataModule(keep_fraction={0: 0.1})
    dm.setup("fit")
    counts = torch.bincount(dm.train_dataset.targets, minlength=10)
    assert counts[0] < 0.2 * counts[1:].float().mean()
    total = len(dm.train_dataset) + len(dm.val_dataset) + len(dm.test_dataset)
    assert total < 1797 and len(dm.val_dataset) + len(dm.test_dataset) > 500
    copy.deepcopy(dm)
