"""SmartMixedPrecision: device-based choice, fp32 modules, loss scale and skipped steps, resume, YAML, bad input.

fp16 + GradScaler runs on CPU too (torch's CPU GradScaler and CPU fp16 autocast), so the skip bookkeeping is tested
here without a GPU; the same checks on CUDA carry the ``gpu`` marker.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_techniques.demo import DigitsCNN, DigitsDataModule, TinyTransformer
from lightning_techniques.optim.guard import NonFiniteTrainingError
from lightning_techniques.optim.precision import SmartMixedPrecision, best_precision, select_modules
from lightning_techniques.testing import assert_same, build_from_yaml


class DtypeProbe(Callback):
    """Output dtypes of chosen sub-modules during training forwards."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.dtypes: dict[str, set[torch.dtype]] = {n: set() for n in names}
        self._handles: list[Any] = []

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        modules = dict(pl_module.named_modules())
        for name in self.names:
            def hook(_m: Any, _i: Any, out: torch.Tensor, name: str = name) -> None:
                self.dtypes[name].add(out.dtype)
            self._handles.append(modules[name].register_forward_hook(hook))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        for h in self._handles:
            h.remove()


class Poison(Callback):
    """NaN inputs on the given global batch indices; weights before/after those batches."""

    def __init__(self, batches: set[int]) -> None:
        self.batches = batches
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx in self.batches:
            batch[0].fill_(float("nan"))
            self.before[trainer.fit_loop.total_batch_idx] = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop.total_batch_idx in self.batches:
            self.after[trainer.fit_loop.total_batch_idx] = copy.deepcopy(pl_module.state_dict())


def _fit(plugin: SmartMixedPrecision, trainer_kwargs: dict, callbacks: list[Callback] | None = None,
         model: Any = None, steps: int = 4, **extra: Any) -> tuple[L.Trainer, Any]:
    L.seed_everything(0)
    model = model or DigitsCNN(channels=8)
    trainer = L.Trainer(max_steps=steps, plugins=[plugin], callbacks=callbacks or [], **{**trainer_kwargs, **extra})
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer, model


# ---------------------------------------------------------------- core
def test_best_precision_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert best_precision("cuda") == "bf16-mixed"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert best_precision("cuda") == "16-mixed"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert best_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert best_precision("cpu") == "32-true"
    assert best_precision("mps") == "32-true"


def test_select_modules_by_name_and_class() -> None:
    model = TinyTransformer()
    assert [n for n, _ in select_modules(model, ["LayerNorm"])] == ["blocks.0.norm1", "blocks.0.norm2",
                                                                   "blocks.1.norm1", "blocks.1.norm2", "norm"]
    assert [n for n, _ in select_modules(model, ["head", "blocks.*.attn.q_proj"])] == [
        "blocks.0.attn.q_proj", "blocks.1.attn.q_proj", "head"]
    assert [n for n, _ in select_modules(model, ["torch.nn.modules.normalization.LayerNorm"])][-1] == "norm"


# ---------------------------------------------------------------- integration (CPU)
def test_bf16_autocast_with_fp32_modules_restored_after_fit(trainer_kwargs: dict) -> None:
    plugin = SmartMixedPrecision("bf16-mixed", device="cpu", fp32_modules=["head", "LayerNorm"])
    probe = DtypeProbe(["embed", "blocks.0.norm1", "blocks.0.attn.q_proj", "head"])
    trainer, model = _fit(plugin, trainer_kwargs, [probe], model=TinyTransformer())
    assert trainer.precision == "bf16-mixed" and plugin.scaler is None
    assert probe.dtypes["embed"] == {torch.bfloat16}
    assert probe.dtypes["blocks.0.attn.q_proj"] == {torch.bfloat16}
    assert probe.dtypes["blocks.0.norm1"] == {torch.float32}
    assert probe.dtypes["head"] == {torch.float32}
    assert "head" in plugin.kept_in_fp32 and "norm" in plugin.kept_in_fp32
    # restored at teardown: no instance-level forward left on the user's modules
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert plugin.scale_history == [] and plugin.skipped_steps == []


def test_auto_falls_back_to_fp32_with_a_warning(monkeypatch: pytest.MonkeyPatch, trainer_kwargs: dict) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.warns(UserWarning, match="fp32"):
        plugin = SmartMixedPrecision("auto", device="cpu")
    probe = DtypeProbe(["features.0", "head"])
    trainer, _ = _fit(plugin, trainer_kwargs, [probe], steps=2)
    assert trainer.precision == "32-true"
    assert probe.dtypes["features.0"] == {torch.float32}


def test_fp16_scaler_skips_are_recorded_and_weights_kept(trainer_kwargs: dict) -> None:
    plugin = SmartMixedPrecision("16-mixed", device="cpu", init_scale=1024.0)
    poison = Poison({2})
    trainer, model = _fit(plugin, trainer_kwargs, [poison], steps=5)
    assert plugin.skipped_steps == [2]
    scales = [s for _, s in plugin.scale_history]
    assert [st for st, _ in plugin.scale_history] == [0, 1, 2, 3, 4]
    assert scales == [1024.0, 1024.0, 512.0, 512.0, 512.0]  # backoff 0.5 on the skipped step only
    assert_same(poison.before[2], poison.after[2])  # the scaler really skipped the optimizer step
    assert plugin.consecutive_skips == 0
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def _amp_rows(tmp_path: Path, trainer_kwargs: dict, every: int, steps: int) -> tuple[L.Trainer, dict]:
    """A 16-mixed run whose step 1 is poisoned, logged to a CSVLogger every ``every`` steps: the trainer and the
    ``{step: (amp/loss_scale, amp/skipped_step)}`` rows of its metrics file."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    plugin = SmartMixedPrecision("16-mixed", device="cpu", init_scale=1024.0)
    kwargs = dict(trainer_kwargs, logger=CSVLogger(tmp_path, name="amp"), log_every_n_steps=every)
    trainer, _ = _fit(plugin, kwargs, [Poison({1})], steps=steps)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    return trainer, {int(r["step"]): (float(r["amp/loss_scale"]), float(r["amp/skipped_step"]))
                     for r in rows if r.get("amp/loss_scale")}


def test_fp16_scale_and_skips_are_logged(tmp_path: Path, trainer_kwargs: dict) -> None:
    trainer, logged = _amp_rows(tmp_path, trainer_kwargs, every=1, steps=3)
    assert logged == {0: (1024.0, 0.0), 1: (512.0, 1.0), 2: (512.0, 0.0)}
    # and, like every technique's step metrics, in the callback metrics (monitorable)
    assert float(trainer.callback_metrics["amp/loss_scale"]) == 512.0
    assert float(trainer.callback_metrics["amp/skipped_step"]) == 0.0


def test_fp16_skips_are_logged_off_the_cadence(tmp_path: Path, trainer_kwargs: dict) -> None:
    trainer, logged = _amp_rows(tmp_path, trainer_kwargs, every=50, steps=4)
    assert logged == {1: (512.0, 1.0)}  # the skip gets its own row; the cadence (50) is not reached
    # the run's last step (off the cadence) still reaches the callback metrics, as for every technique
    assert float(trainer.callback_metrics["amp/skipped_step"]) == 0.0


def test_log_false_logs_nothing_and_still_records(tmp_path: Path, trainer_kwargs: dict) -> None:
    from lightning.pytorch.loggers import CSVLogger

    plugin = SmartMixedPrecision("16-mixed", device="cpu", init_scale=1024.0, log=False)
    kwargs = dict(trainer_kwargs, logger=CSVLogger(tmp_path, name="amp"), log_every_n_steps=1)
    trainer, _ = _fit(plugin, kwargs, [Poison({1})], steps=3)
    metrics = Path(trainer.logger.log_dir) / "metrics.csv"
    assert "amp/" not in (metrics.read_text() if metrics.exists() else "")
    assert plugin.skipped_steps == [1] and [s for _, s in plugin.scale_history] == [1024.0, 512.0, 512.0]


@pytest.mark.parametrize("on_limit", ["raise", "stop"])
def test_too_many_consecutive_skips_stop_the_run(on_limit: str, trainer_kwargs: dict) -> None:
    plugin = SmartMixedPrecision("16-mixed", device="cpu", max_consecutive_skips=2, on_limit=on_limit)
    if on_limit == "raise":
        with pytest.raises(NonFiniteTrainingError, match="skipped 2 consecutive"):
            _fit(plugin, trainer_kwargs, [Poison({1, 2, 3})], steps=6)
    else:
        with pytest.warns(UserWarning, match="Stopping the run"):
            trainer, _ = _fit(plugin, trainer_kwargs, [Poison({1, 2, 3})], steps=6)
        assert trainer.global_step == 3
    assert plugin.skipped_steps == [1, 2]


class SaveAt(Callback):
    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and not Path(self.path).exists():
            trainer.save_checkpoint(self.path)


def test_exact_resume_keeps_scale_and_history(tmp_path: Path, trainer_kwargs: dict) -> None:
    # assert_exact_resume shares trainer_kwargs (and so one plugin object) between its runs: done by hand here,
    # the same way (checkpoint at the split step's batch end, mid-epoch, loaded with weights_only=True)
    def run(steps: int, ckpt: str | None = None, save: str | None = None) -> tuple[SmartMixedPrecision, Any]:
        plugin = SmartMixedPrecision("16-mixed", device="cpu", init_scale=256.0, growth_interval=2)
        L.seed_everything(0)
        model = DigitsCNN(channels=8)
        callbacks: list[Callback] = [Poison({1})] + ([SaveAt(3, save)] if save else [])
        trainer = L.Trainer(max_steps=steps, plugins=[plugin], callbacks=callbacks, deterministic=True,
                            default_root_dir=str(tmp_path), **trainer_kwargs)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32), ckpt_path=ckpt,
                    weights_only=True if ckpt else None)
        return plugin, model

    straight, straight_model = run(6)
    ckpt = str(tmp_path / "half.ckpt")
    run(3, save=ckpt)
    resumed, resumed_model = run(6, ckpt=ckpt)
    assert_same(straight.state_dict(), resumed.state_dict(), "plugin")
    assert_same(straight_model.state_dict(), resumed_model.state_dict(), "module")
    assert straight.skipped_steps == [1]
    assert [s for _, s in straight.scale_history] == [256.0, 128.0, 128.0, 256.0, 256.0, 512.0]


def test_fp32_modules_that_match_nothing_fail_before_the_first_step(trainer_kwargs: dict) -> None:
    plugin = SmartMixedPrecision("bf16-mixed", device="cpu", fp32_modules=["decoder"])
    with pytest.raises(ValueError, match="no module matches fp32_modules=.*head"):
        _fit(plugin, trainer_kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"precision": "fp8"}, ValueError, "precision"),
        ({"fp32_modules": "head"}, TypeError, "fp32_modules"),
        ({"max_consecutive_skips": 0}, ValueError, "max_consecutive_skips"),
        ({"on_limit": "ignore"}, ValueError, "on_limit"),
        ({"init_scale": 0.0}, ValueError, "init_scale"),
        ({"device": 3}, TypeError, "device"),
        ({"log": "no"}, TypeError, "log must be True or False"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SmartMixedPrecision(**kwargs)


def test_builds_from_yaml_under_trainer_plugins(tmp_path: Path) -> None:
    config = {
        "trainer": {
            "max_steps": 2,
            "default_root_dir": str(tmp_path),
            "plugins": [
                {
                    "class_path": "lightning_techniques.SmartMixedPrecision",
                    "init_args": {"precision": "bf16-mixed", "device": "cpu", "fp32_modules": ["head"],
                                  "max_consecutive_skips": 5},
                }
            ],
        },
        "model": {"class_path": "lightning_techniques.demo.DigitsCNN", "init_args": {"channels": 8}},
        "data": {"class_path": "lightning_techniques.demo.DigitsDataModule"},
    }
    cli = build_from_yaml(config)
    plugin = cli.trainer.precision_plugin
    assert isinstance(plugin, SmartMixedPrecision)
    assert plugin.precision == "bf16-mixed" and plugin.fp32_modules == ["head"] and plugin.max_consecutive_skips == 5
    assert cli.trainer.precision == "bf16-mixed"


# ---------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_auto_on_cuda_and_fp16_skips(trainer_kwargs: dict) -> None:
    plugin = SmartMixedPrecision("auto")
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert plugin.precision == expected and plugin.device == "cuda"
    fp16 = SmartMixedPrecision("16-mixed", init_scale=1024.0, fp32_modules=["head"])
    probe = DtypeProbe(["features.0", "head"])
    poison = Poison({2})
    kwargs = dict(trainer_kwargs, accelerator="gpu")
    _fit(fp16, kwargs, [probe, poison], steps=5)
    assert fp16.skipped_steps == [2]
    assert [s for _, s in fp16.scale_history] == [1024.0, 1024.0, 512.0, 512.0, 512.0]
    assert probe.dtypes["features.0"] == {torch.float16} and probe.dtypes["head"] == {torch.float32}
    assert_same(poison.before[2], poison.after[2])


def test_scale_history_and_skipped_steps_are_bounded(trainer_kwargs: dict) -> None:
    from lightning_techniques.optim.guard import MAX_RECORDED_STEPS

    plugin = SmartMixedPrecision("16-mixed", device="cpu", init_scale=1024.0, history_size=2)
    _fit(plugin, trainer_kwargs, [Poison({2})], steps=5)
    assert plugin.scale_history == [(3, 512.0), (4, 512.0)]  # the most recent history_size entries
    assert plugin.skipped_steps == [2] and plugin.skipped_total == 1
    # a long run's state stays bounded: loading an oversized (older, unbounded) state keeps only the tail
    long_state = dict(plugin.state_dict(), scale_history=[[s, 1.0] for s in range(50)],
                      skipped_steps=list(range(MAX_RECORDED_STEPS + 10)), skipped_total=MAX_RECORDED_STEPS + 10)
    fresh = SmartMixedPrecision("16-mixed", device="cpu", history_size=2)
    fresh.load_state_dict(long_state)
    assert fresh.scale_history == [(48, 1.0), (49, 1.0)]
    assert len(fresh.skipped_steps) == MAX_RECORDED_STEPS and fresh.skipped_steps[-1] == MAX_RECORDED_STEPS + 9
    assert fresh.skipped_total == MAX_RECORDED_STEPS + 10
    with pytest.raises(ValueError, match="history_size"):
        SmartMixedPrecision("16-mixed", device="cpu", history_size=0)
