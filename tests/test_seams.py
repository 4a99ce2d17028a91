"""The seams between techniques: one patch stack per (object, method) restored in any order, exact resume of
epoch-bound runs where accumulation planning meets a steered sampler, conflicts refused in ``setup`` before any
optimizer step, Lightning internals through ``_internal.compat`` only, and no process-wide warning filter."""

from __future__ import annotations

import io
import itertools
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_techniques._internal import compat
from lightning_techniques._internal.conflicts import EXCLUSIVE, MECHANISMS, check_conflicts
from lightning_techniques._internal.patching import MethodPatch, patch_layers
from lightning_techniques.data import ClassWeightedLoss, CurriculumLearning, Oversampling
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.normalization import MinMaxNormalization, ZScoreNormalization
from lightning_techniques.optim import (
    AccumulationScheduler,
    AdaptiveGradientClipping,
    AutoClip,
    LRSchedule,
    OptimizerCallback,
    ReduceLROnPlateau,
)

ROOT = Path(__file__).resolve().parents[1]


def _quiet(**kwargs: Any) -> dict[str, Any]:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return base


class _Fail(Exception):
    pass


class _FailAt(Callback):
    """Raises in the batch after ``step`` optimizer steps (a crash mid-fit)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            raise _Fail(f"failure injected at step {trainer.global_step}")


class _StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps += 1


# ------------------------------------------------------------------------------------------------ the patch stack
class _Obj:
    def f(self, x: int) -> int:
        return x


_LAYERS = {"plus1": lambda call_next: lambda x: call_next(x) + 1,
           "times2": lambda call_next: lambda x: call_next(x) * 2,
           "plus10": lambda call_next: lambda x: call_next(x) + 10}
_APPLY = {"plus1": lambda v: v + 1, "times2": lambda v: v * 2, "plus10": lambda v: v + 10}


@pytest.mark.parametrize("removal", list(itertools.permutations(range(3))))
def test_patch_layers_are_removable_in_any_order(removal: tuple[int, ...]) -> None:
    obj = _Obj()
    names = list(_LAYERS)
    patches = [MethodPatch(obj, "f", _LAYERS[name]) for name in names]
    assert obj.f(1) == ((1 + 1) * 2) + 10 and patch_layers(obj, "f") == 3
    alive = list(names)
    for index in removal:
        patches[index].restore()
        patches[index].restore()  # idempotent
        alive.remove(names[index])
        expected = 1
        for name in alive:  # the remaining layers, bottom first, still compose
            expected = _APPLY[name](expected)
        assert obj.f(1) == expected
    assert obj.__dict__ == {} and patch_layers(obj, "f") == 0


def test_patch_stack_restores_an_own_instance_attribute_and_respects_a_foreign_one() -> None:
    obj = _Obj()
    own = lambda x: -x  # noqa: E731
    obj.f = own
    patch = MethodPatch(obj, "f", _LAYERS["plus1"])
    assert obj.f(3) == -2
    patch.restore()
    assert obj.__dict__["f"] is own
    # someone else replaces the attribute after us: their attribute stays; our dispatcher calls straight through
    obj2 = _Obj()
    patch = MethodPatch(obj2, "f", _LAYERS["plus1"])
    ours = obj2.f
    obj2.f = lambda x: ours(x) * 100
    patch.restore()
    assert obj2.f(1) == 100


# ---------------------------------------- defect 3: the module stays patched (AccumulationScheduler + optimizer owner)
def _owner(kind: str) -> Callback:
    return OptimizerCallback("sgd", lr=0.05) if kind == "optimizer" else LRSchedule("cosine", log=False)


@pytest.mark.parametrize("fail", [False, True], ids=["after_fit", "after_exception"])
@pytest.mark.parametrize("accumulation_first", [True, False], ids=["acc_first", "acc_last"])
@pytest.mark.parametrize("kind", ["optimizer", "schedule"])
def test_module_untouched_with_accumulation_and_a_configure_optimizers_owner(
    kind: str, accumulation_first: bool, fail: bool
) -> None:
    L.seed_everything(0)
    module = DigitsCNN(channels=4)
    keys = set(module.__dict__)
    techniques = [AccumulationScheduler({0: 1, 2: 2}), _owner(kind)]
    if not accumulation_first:
        techniques.reverse()
    trainer = L.Trainer(max_epochs=1, limit_train_batches=6, callbacks=techniques + ([_FailAt(2)] if fail else []),
                        **_quiet())
    if fail:
        with pytest.raises(_Fail):
            trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    else:
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
        assert trainer.global_step == 4  # k=1, 1, then k=2 twice
    assert set(module.__dict__) == keys, f"left on the module: {sorted(set(module.__dict__) - keys)}"
    assert patch_layers(module, "configure_optimizers") == 0
    torch.save(module, io.BytesIO())  # a left-over local wrapper would not pickle
    assert trainer.accumulate_grad_batches == 1  # the Trainer is as the user built it


# ------------------------------------- defect 2: exact resume, max_epochs-bound, accumulation planning + steered sampler
class _SaveThenKill(Callback):
    """Saves a checkpoint after ``step`` optimizer steps (where ModelCheckpoint would), then simulates a kill."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path, self.saved = step, path, False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.saved:
            trainer.save_checkpoint(self.path)
            self.saved = True
            raise _Fail("killed")


class _Batches(Callback):
    def __init__(self) -> None:
        self.targets: list[list[int]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.targets.append(batch[1].tolist())


_STEERERS = {
    "oversampling": lambda: Oversampling(mode="inverse", seed=3),
    "curriculum": lambda: CurriculumLearning(difficulty_fn=lambda item: float(item[1]), pace_by="step",
                                             start_fraction=0.3, full_at=6, seed=1),
}


class _PlainDigits(DigitsDataModule):
    """The demo data through a plain shuffling DataLoader, as most users write it (no state_dict: Lightning cannot
    resume it; only the steering technique's own state can)."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)


@pytest.mark.parametrize("steerer", list(_STEERERS))
def test_epoch_bound_mid_epoch_resume_with_accumulation_and_a_steered_sampler(steerer: str, tmp_path: Path) -> None:
    kwargs = _quiet(max_epochs=2, limit_train_batches=6, deterministic=True)

    def run(callbacks: list[Callback], ckpt: Path | None = None) -> tuple[nn.Module, _Batches]:
        L.seed_everything(0)
        module, batches = DigitsCNN(channels=4), _Batches()
        techniques = [AccumulationScheduler({0: 1, 3: 2}, unit="step"), _STEERERS[steerer]()]
        trainer = L.Trainer(callbacks=techniques + [batches] + callbacks, **kwargs)
        trainer.fit(module, datamodule=_PlainDigits(batch_size=32), ckpt_path=str(ckpt) if ckpt else None,
                    weights_only=True if ckpt else None)
        return module, batches

    straight, straight_batches = run([])
    ckpt = tmp_path / "mid_epoch.ckpt"
    with pytest.raises(_Fail):  # epoch 0: k=1 for 3 steps, then k=2: steps 4, 5; epoch 1: k=2 - step 7 is mid-epoch
        run([_SaveThenKill(7, ckpt)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed, resumed_batches = run([], ckpt)
    # the steered order resumes exactly: Lightning's "not resumable" warning is silenced (locally) for this run only
    assert not [w for w in caught if compat.MID_EPOCH_RESUME_WARNING in str(w.message)]
    # the resumed epoch continues the same draw at the same position (it would restart it if the restored position
    # were used up by the accumulation planning)
    assert resumed_batches.targets == straight_batches.targets[-len(resumed_batches.targets):]
    assert len(resumed_batches.targets) == 2  # epoch 1 has 6 batches; its first two groups ran before the kill
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs after the resume"


def test_no_process_wide_warning_filter(tmp_path: Path) -> None:
    before = list(warnings.filters)
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=2, callbacks=[Oversampling(), AccumulationScheduler({0: 2})], **_quiet())
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=64))
    assert warnings.filters == before
    offenders = []
    for path in (ROOT / "lightning_techniques").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"warnings\.(filterwarnings|simplefilter)\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    # the CLI program owns its process (it is not library code a user's run imports)
    program = "lightning_techniques/demo/cli.py"
    assert [o for o in offenders if not o.startswith(program) and not _inside_catch_warnings(o)] == [], (
        "filters must be local (warnings.catch_warnings)")


def _inside_catch_warnings(where: str) -> bool:
    path, number = where.split(":")
    lines = (ROOT / path).read_text().splitlines()[: int(number)]
    indent = len(lines[-1]) - len(lines[-1].lstrip())
    for line in reversed(lines[:-1]):
        stripped = line.lstrip()
        if stripped and len(line) - len(stripped) < indent:
            return "warnings.catch_warnings()" in line
    return False


# ------------------------------------------------------------------- defect 4: conflicts refused in setup, before any step
_CONFLICTS = {
    "lbfgs+accumulation": (lambda: [OptimizerCallback("lbfgs"), AccumulationScheduler({0: 1, 2: 2})], {},
                           "OptimizerCallback\\(name='lbfgs'\\) cannot be used together with AccumulationScheduler"),
    "lightning_accumulation+lbfgs": (lambda: [GradientAccumulationScheduler({0: 1}), OptimizerCallback("lbfgs")], {},
                                     "cannot be used together with GradientAccumulationScheduler"),
    "lbfgs+agc": (lambda: [OptimizerCallback("lbfgs"), AdaptiveGradientClipping()], {},
                  "cannot be used together with AdaptiveGradientClipping: clipping would run inside"),
    "autoclip+lbfgs": (lambda: [AutoClip(), OptimizerCallback("lbfgs")], {}, "together with AutoClip"),
    "lbfgs+gradient_clip_val": (lambda: [OptimizerCallback("lbfgs")], {"gradient_clip_val": 1.0},
                                "gradient_clip_val=1.0"),
    # two instances of one stateful class: Lightning itself refuses them at fit start (RuntimeError, no step)
    "two_optimizers": (lambda: [OptimizerCallback("adam"), OptimizerCallback("sgd")], {},
                       "more than one stateful callback of type `OptimizerCallback`"),
    "two_sampler_steerers": (lambda: [CurriculumLearning(difficulty="self_paced"), Oversampling()], {},
                             "CurriculumLearning cannot be used together with Oversampling"),
    "schedule+plateau": (lambda: [LRSchedule("cosine"), ReduceLROnPlateau("train_loss")], {},
                         "LRSchedule cannot be used together with ReduceLROnPlateau"),
    "two_schedules": (lambda: [LRSchedule("cosine"), LRSchedule("linear")], {},
                      "more than one stateful callback of type `LRSchedule`"),
    "schedule+swa": (lambda: [LRSchedule("cosine"), StochasticWeightAveraging(swa_lrs=0.01)], {},
                     "together with StochasticWeightAveraging"),
    "accumulation+lightning_accumulation": (
        lambda: [AccumulationScheduler({0: 2}), GradientAccumulationScheduler({0: 2})], {},
        "cannot be used together with GradientAccumulationScheduler"),
    "accumulation+trainer_accumulation": (lambda: [AccumulationScheduler({0: 2})], {"accumulate_grad_batches": 3},
                                          "accumulate_grad_batches=3\\) conflicts with AccumulationScheduler"),
    "zscore+minmax": (lambda: [ZScoreNormalization(), MinMaxNormalization()], {},
                      "ZScoreNormalization cannot be used together with MinMaxNormalization"),
    "two_class_weightings": (lambda: [ClassWeightedLoss(), ClassWeightedLoss(mode="effective")], {},
                             "more than one stateful callback of type `ClassWeightedLoss`"),
}


@pytest.mark.parametrize("reverse", [False, True], ids=["order_a", "order_b"])
@pytest.mark.parametrize("case", list(_CONFLICTS))
def test_conflicts_are_refused_in_setup_before_any_step(case: str, reverse: bool) -> None:
    make, trainer_kwargs, match = _CONFLICTS[case]
    techniques = make()
    if reverse:
        techniques.reverse()
    counter = _StepCounter()
    L.seed_everything(0)
    module = DigitsCNN(channels=4)
    keys, weights = set(module.__dict__), {k: v.clone() for k, v in module.state_dict().items()}
    error = RuntimeError if "stateful callback" in match else ValueError
    with pytest.raises(error, match=None if reverse else match) as info:  # reversed: the names swap places
        trainer = L.Trainer(max_steps=4, callbacks=[*techniques, counter], **_quiet(**trainer_kwargs))
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    assert counter.steps == 0, f"{case}: {counter.steps} optimizer steps ran before the conflict was refused"
    assert all(type(t).__name__ in str(info.value) for t in techniques), str(info.value)
    assert set(module.__dict__) == keys and patch_layers(module, "configure_optimizers") == 0
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())


def test_every_owned_technique_declares_what_it_takes_over() -> None:
    owned = [AccumulationScheduler, OptimizerCallback, LRSchedule, ReduceLROnPlateau, ClassWeightedLoss, Oversampling,
             CurriculumLearning, ZScoreNormalization, MinMaxNormalization]
    for cls in owned:
        assert isinstance(cls.takes_over, frozenset) and cls.takes_over and cls.takes_over <= MECHANISMS, cls
        assert isinstance(cls.conflicts_with, tuple) and all(isinstance(n, str) for n in cls.conflicts_with), cls
    assert EXCLUSIVE <= MECHANISMS
    # an instance may refuse more than its class: L-BFGS cannot accumulate or be clipped
    assert "AccumulationScheduler" in OptimizerCallback("lbfgs").conflicts_with
    assert "AccumulationScheduler" not in OptimizerCallback("adamw").conflicts_with


def test_check_conflicts_rejects_unknown_mechanisms() -> None:
    class Odd(Callback):
        takes_over = frozenset({"teleportation"})

    with pytest.raises(ValueError, match="unknown mechanisms \\['teleportation'\\]"):
        check_conflicts(type("T", (), {"callbacks": []})(), Odd())


# ------------------------------------------------------------------------------ every Lightning internal, through compat
def _index_loader(n: int = 20, batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 3), torch.arange(n)), batch_size=batch_size, shuffle=True)


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 1)
        self.seen: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> Any:
        trainer = self.trainer
        self.seen["set_up_before"] = compat.fit_loader_is_set_up(trainer)
        self.seen["count"] = compat.count_train_batches(trainer)
        self.seen["set_up_after"] = compat.fit_loader_is_set_up(trainer)
        self.seen["source"] = compat.train_data_source(trainer) is not None
        with compat.stepping_batches_as(trainer, 7):
            self.seen["estimate"] = trainer.estimated_stepping_batches
        self.seen["estimate_after"] = trainer.estimated_stepping_batches  # Lightning's own (sets the loader up)
        compat.discard_train_loader(trainer)
        self.seen["discarded"] = not compat.fit_loader_is_set_up(trainer)
        self.seen["trainer_of"] = compat.trainer_of(self) is trainer
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_train_start(self) -> None:
        self.seen["fetcher"] = compat.train_data_fetcher(self.trainer) is not None


def test_compat_train_data_helpers() -> None:
    module = _Tiny()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=4, accumulate_grad_batches=2, **_quiet())
    trainer.fit(module, train_dataloaders=_index_loader())
    seen = module.seen
    assert seen["set_up_before"] is False and seen["set_up_after"] is False, "counting must not set the loader up"
    assert seen["count"] == 4 == trainer.num_training_batches and seen["source"]
    assert seen["estimate"] == 7 and seen["estimate_after"] == 4  # ceil(4 / 2) * 2 epochs
    assert seen["discarded"] and trainer.global_step == 4  # the loop set its loader up again itself
    assert compat.fit_progress(trainer) == (2, 4)
    assert seen["trainer_of"] and seen["fetcher"] and compat.trainer_of(nn.Linear(1, 1)) is None
    assert compat.count_train_batches(trainer) == 4  # after fit: the loop's own count


def test_compat_step_metric_stores_are_the_trainers_metric_dicts() -> None:
    seen: dict[str, Any] = {}

    class Probe(Callback):
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            stores = compat.step_metric_stores(trainer)
            assert stores is not None
            seen.setdefault("steps", []).append(stores[2])
            seen.setdefault("same", []).append(
                trainer.callback_metrics is stores[0] and trainer.logged_metrics is stores[1])
            stores[0]["seam/x"] = torch.tensor(1.0)

    trainer = L.Trainer(max_steps=3, callbacks=[Probe()], **_quiet())
    trainer.fit(_Tiny(), train_dataloaders=_index_loader())
    assert seen["steps"] == [0, 1, 2]  # the step Lightning logs each batch's step metrics at
    assert seen["same"] == [True] * 3  # the dictionaries behind trainer.callback_metrics / logged_metrics
    assert float(trainer.callback_metrics["seam/x"]) == 1.0  # kept after fit (Lightning moves them to the CPU)
    assert compat.step_metric_stores(object()) is None  # anything else: the callers fall back to pl_module.log


def test_compat_update_dataloader_and_optimizer_parsing() -> None:
    loader = _index_loader()
    sampler = torch.utils.data.SequentialSampler(loader.dataset)
    rebuilt = compat.update_dataloader(loader, sampler)
    assert rebuilt.sampler is sampler and rebuilt.batch_size == 4 and rebuilt.dataset is loader.dataset
    layer = nn.Linear(2, 1)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    optimizers, schedulers, monitor = compat.parse_optimizer_config(([opt], [sched]))
    assert optimizers == [opt] and schedulers == [sched] and monitor is None
    optimizers, schedulers, _ = compat.parse_optimizer_config(None)
    assert len(optimizers) == 1 and schedulers == []  # Lightning's placeholder optimizer


def test_compat_strategy_checks_use_isinstance() -> None:
    class DeepspeedLookingName(SingleDeviceStrategy):  # a name is not a type
        pass

    class MyDDP(DDPStrategy):
        pass

    single = DeepspeedLookingName(torch.device("cpu"))
    assert not compat.is_deepspeed(single) and not compat.shards_parameters(single)
    assert not compat.is_fsdp(MyDDP()) and not compat.strategy_owns_accumulation(MyDDP())
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    class MyDeepSpeed(DeepSpeedStrategy):
        def __init__(self) -> None:  # no deepspeed install needed to check the type
            pass

    class MyFSDP(FSDPStrategy):
        def __init__(self) -> None:
            pass

    assert compat.is_deepspeed(MyDeepSpeed()) and compat.strategy_owns_accumulation(MyDeepSpeed())
    assert compat.is_fsdp(MyFSDP()) and compat.shards_parameters(MyFSDP())
    from lightning.pytorch.utilities import CombinedLoader

    assert compat.is_combined_loader(CombinedLoader([_index_loader()])) and not compat.is_combined_loader([])
    source = (ROOT / "lightning_techniques").rglob("*.py")
    name_checks = [f"{p.relative_to(ROOT)}" for p in source
                   if re.search(r"type\((trainer\.)?strategy\)\.__name__\.lower\(\)", p.read_text())]
    mine = {"lightning_techniques/optim/accumulation.py", "lightning_techniques/optim/optimizers.py",
            "lightning_techniques/optim/schedules.py", "lightning_techniques/normalization/_base.py",
            "lightning_techniques/optim/guard.py", "lightning_techniques/optim/clipping.py",
            "lightning_techniques/init/lsuv.py"}
    assert not mine & set(name_checks), name_checks


def test_compat_quiets_the_resume_warning_locally_only() -> None:
    trainer = L.Trainer(max_steps=1, **_quiet())
    loop = trainer.fit_loop.epoch_loop
    exact = {"value": True}

    def noisy(*args: Any, **kwargs: Any) -> None:
        warnings.warn(compat.MID_EPOCH_RESUME_WARNING + " and your dataloader is not resumable.", UserWarning, stacklevel=1)

    loop.reset = noisy  # stands for Lightning's reset, which warns on a mid-epoch resume
    patch = compat.quiet_mid_epoch_resume_warning(trainer, lambda: exact["value"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop.reset()
        exact["value"] = False
        loop.reset()
        warnings.warn(compat.MID_EPOCH_RESUME_WARNING + " elsewhere", UserWarning, stacklevel=1)
    assert [str(w.message).endswith("elsewhere") for w in caught] == [False, True]
    patch.restore()
    assert loop.__dict__["reset"] is noisy


def test_lightning_upper_bound_is_pinned_and_installed() -> None:
    from importlib.metadata import version

    from packaging.specifiers import SpecifierSet

    text = (ROOT / "pyproject.toml").read_text()
    pinned = re.search(r'"lightning(>=[^"]+)"', text)
    assert pinned is not None and pinned.group(1) == compat.LIGHTNING_SUPPORTED.replace(" ", "")
    spec = SpecifierSet(pinned.group(1))
    assert any(s.operator == "<" for s in spec), "an upper bound on lightning"
    assert version("lightning") in spec


# ------------------------------------------------------------------- the mechanisms undo themselves when a run fails
class _Forgetful(Callback):
    """Uses every shared mechanism and undoes nothing itself (no teardown, no on_exception)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning_techniques._internal import CriterionHandle, SamplerSteering, add_batch_transform, add_loss_term
        from lightning_techniques.optim._configure import register_scheduler_provider

        add_batch_transform(trainer, pl_module, "identity", lambda batch, stage: batch)
        add_loss_term(pl_module, "zero", lambda module, batch, batch_idx, loss: 0.0 * loss, log=False)
        CriterionHandle(pl_module).set(label_smoothing=0.1)
        register_scheduler_provider(pl_module, self, lambda module, optimizers: [])
        SamplerSteering(trainer, lambda dataset, loader: ((lambda epoch: list(range(len(dataset)))), len(dataset)),
                        owner="Forgetful")


@pytest.mark.parametrize("fail", [False, True], ids=["after_fit", "after_exception"])
def test_mechanisms_undo_what_a_technique_forgets(fail: bool) -> None:
    L.seed_everything(0)
    module, datamodule = DigitsCNN(channels=4), DigitsDataModule(batch_size=64)
    keys = set(module.__dict__)
    trainer = L.Trainer(max_steps=3, callbacks=[_Forgetful()] + ([_FailAt(1)] if fail else []), **_quiet())
    if fail:
        with pytest.raises(_Fail):
            trainer.fit(module, datamodule=datamodule)
    else:
        trainer.fit(module, datamodule=datamodule)
    assert set(module.__dict__) == keys
    for name in ("training_step", "configure_optimizers", "on_after_batch_transfer"):
        assert name not in module.__dict__ and name not in datamodule.__dict__, name
    assert module.criterion.label_smoothing == 0.0
    assert "dataloader" not in compat.train_data_source(trainer).__dict__
    assert "reset" not in trainer.fit_loop.epoch_loop.__dict__
    torch.save(module, io.BytesIO())


class _ValInputs(Callback):
    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self.inputs.append(batch[0].detach().clone())


def test_a_technique_installs_again_after_a_failed_run() -> None:
    from lightning_techniques.demo import BreastCancerDataModule, TabularMLP

    L.seed_everything(0)
    norm, module, datamodule = ZScoreNormalization(), TabularMLP(), BreastCancerDataModule()
    with pytest.raises(_Fail):
        L.Trainer(max_steps=3, callbacks=[norm, _FailAt(1)], **_quiet()).fit(module, datamodule=datamodule)
    assert norm.fitted and "on_after_batch_transfer" not in datamodule.__dict__  # undone by the mechanism
    seen = _ValInputs()
    L.Trainer(callbacks=[norm, seen], **_quiet(limit_val_batches=1)).validate(module, datamodule=datamodule,
                                                                             verbose=False)
    raw = next(iter(datamodule.val_dataloader()))[0]
    torch.testing.assert_close(seen.inputs[0], norm.export_module()(raw))  # the transform is applied again
    assert "on_after_batch_transfer" not in datamodule.__dict__
