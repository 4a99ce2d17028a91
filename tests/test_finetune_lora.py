"""LoRA and peft's other weight adapters through one callback: what only adapters train means (the optimizer, the base
weights, requires_grad given back), targets by name / regex / type, merge, adapter-only checkpoints and files,
never wrapping twice, the optimizer built before the adapters existed, bad input. Resume, YAML, DDP and "nothing
but the declared change" come from the registry contract."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_techniques import LoRA, OptimizerCallback
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule
from lightning_techniques.finetune._peft import adapter_parameter_names, tuner_layers
from lightning_techniques.functional import apply_lora, load_adapter, merge_lora, save_adapter
from lightning_techniques.testing import assert_exact_resume

pytest.importorskip("peft")


def trainer(tmp_path: Path, steps: int = 3, **kwargs: Any) -> L.Trainer:
    base = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=str(tmp_path), deterministic=True)
    base.update(kwargs)
    return L.Trainer(**base)


def data() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32)


def optimizer_ids(t: L.Trainer) -> set[int]:
    return {id(p) for opt in t.optimizers for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "loha", "lokr"])
def test_each_method_trains_only_its_adapters(method: str, tmp_path: Path) -> None:
    L.seed_everything(0)
    module = DigitsCNN(channels=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = LoRA(targets=["features.0", "head"], method=method, rank=2, alpha=4.0)
    t = trainer(tmp_path, callbacks=[callback])
    t.fit(module, datamodule=data())
    assert callback.changed_paths == ("features.0", "head")
    params = dict(module.named_parameters())
    names = adapter_parameter_names(module)
    assert names and all(n.startswith(("features.0.", "head.")) for n in names)
    # only the adapters were in the optimizer, only they changed, and they did
    assert optimizer_ids(t) == {id(params[n]) for n in names}
    after = module.state_dict()
    for key, value in before.items():  # every base weight as it was (under the wrapper's base_layer)
        moved = key.replace("features.0.", "features.0.base_layer.").replace("head.", "head.base_layer.")
        assert torch.equal(after[key] if key in after else after[moved], value), key
    fresh = _fresh_adapters(method)
    assert any(not torch.equal(after[n], fresh[n]) for n in names), "the adapters did not train"
    # requires_grad given back to every pre-existing parameter (the adapters stay trainable)
    assert all(p.requires_grad for p in module.parameters())


def _fresh_adapters(method: str) -> dict[str, torch.Tensor]:
    """The adapters as the run's setup initialised them (same seed, same draws)."""
    L.seed_everything(0)
    fresh = DigitsCNN(channels=4)
    apply_lora(fresh, ["features.0", "head"], method=method, rank=2, alpha=4.0)
    return fresh.state_dict()


def test_targets_by_name_regex_and_type() -> None:
    mlp = DeepMLP(depth=4, width=16)
    assert apply_lora(copy.deepcopy(mlp), ["net.1"], rank=2) == ["net.1"]
    assert apply_lora(copy.deepcopy(mlp), [r"net\.[35]"], rank=2) == ["net.3", "net.5"]
    assert apply_lora(copy.deepcopy(mlp), "Linear", rank=2) == ["net.1", "net.3", "net.5", "net.7"]
    cnn = DigitsCNN(channels=4)
    assert apply_lora(cnn, [nn.Conv2d], rank=2) == ["features.0", "features.2", "features.5"]  # a class works too
    # a type never selects the tuner's own insides (base_layer, lora_A ...), and a second call wraps nothing twice
    assert apply_lora(cnn, ["Conv2d"], rank=2) == ["features.0", "features.2", "features.5"]
    assert isinstance(cnn.features[0].base_layer, nn.Conv2d)
    with pytest.raises(ValueError, match="already carries"):
        apply_lora(cnn, ["features.0"], method="ia3")


def test_fitting_twice_never_wraps_twice(tmp_path: Path) -> None:
    module = DigitsCNN(channels=4)
    for _ in range(2):
        trainer(tmp_path, callbacks=[LoRA(targets="head", rank=2)]).fit(module, datamodule=data())
    assert list(tuner_layers(module)) == ["head"] and isinstance(module.head.base_layer, nn.Linear)


def test_optimizer_callback_gets_only_the_adapters(tmp_path: Path) -> None:
    module = DigitsCNN(channels=4)
    t = trainer(tmp_path, callbacks=[OptimizerCallback("adamw", lr=0.01, weight_decay=0.1), LoRA(targets="head")])
    t.fit(module, datamodule=data())
    params = dict(module.named_parameters())
    assert optimizer_ids(t) == {id(params[n]) for n in adapter_parameter_names(module)}


class _EarlyOptimizer(DigitsCNN):
    """A module whose optimizer is built in __init__: it holds the base weights LoRA freezes, not the adapters."""

    def __init__(self) -> None:
        super().__init__(channels=4)
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.opt


def test_an_optimizer_without_the_adapters_is_refused_before_any_step(tmp_path: Path) -> None:
    module = _EarlyOptimizer()
    t = trainer(tmp_path, callbacks=[LoRA(targets="head")])
    with pytest.raises(RuntimeError, match="optimizer does not hold the trainable adapter weights"):
        t.fit(module, datamodule=data())
    assert t.global_step == 0
    assert all(p.requires_grad for p in module.parameters())  # given back after the refusal
    assert not module.opt.param_groups[0]["params"]  # the frozen weights were taken out: never updated


def test_merged_and_unmerged_outputs_agree_and_load_from_checkpoint_works(tmp_path: Path) -> None:
    x = torch.randn(8, 1, 8, 8)
    L.seed_everything(0)
    adapted = DigitsCNN(channels=4)
    trainer(tmp_path / "a", steps=4, callbacks=[LoRA(targets=["features.0", "head"], rank=2)]).fit(
        adapted, datamodule=data())
    merged = copy.deepcopy(adapted)
    assert merge_lora(merged) == ["features.0", "head"]
    adapted.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-5, rtol=1e-5)
    assert type(merged.head) is nn.Linear and set(merged.state_dict()) == set(DigitsCNN(channels=4).state_dict())

    L.seed_everything(0)
    module = DigitsCNN(channels=4)
    t = trainer(tmp_path / "b", steps=4, callbacks=[LoRA(targets=["features.0", "head"], rank=2, merge=True)])
    t.fit(module, datamodule=data())
    assert not tuner_layers(module) and type(module.features[0]) is nn.Conv2d
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), adapted(x), atol=1e-5, rtol=1e-5)  # same run, merged at the end
    t.save_checkpoint(tmp_path / "merged.ckpt")
    loaded = DigitsCNN.load_from_checkpoint(tmp_path / "merged.ckpt", weights_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module(x))


def test_adapter_only_checkpoints_resume_exactly(tmp_path: Path) -> None:
    straight = assert_exact_resume(lambda: DigitsCNN(channels=4), data,
                                   lambda: [LoRA(targets=["head"], rank=2, adapter_only_checkpoints=True)],
                                   tmp_path, total_steps=4, split_step=2, trainer_kwargs={"limit_val_batches": 0})
    ckpt = torch.load(next(Path(tmp_path).rglob("*.ckpt")), weights_only=True)
    assert sorted(ckpt["state_dict"]) == ["head.lora_A.default.weight", "head.lora_B.default.weight"]
    assert straight["module"].strict_loading  # the run's relaxed loading was given back


def test_adapter_file_loads_onto_a_fresh_base_model(tmp_path: Path) -> None:
    L.seed_everything(0)
    base = DigitsCNN(channels=4)
    pristine = copy.deepcopy(base)
    trainer(tmp_path, callbacks=[LoRA(targets=["head"], method="dora", rank=2)]).fit(base, datamodule=data())
    path = save_adapter(base, tmp_path / "head.adapter", method="dora", rank=2)
    assert path.stat().st_size < 20_000
    assert load_adapter(pristine, path) == ["head"]
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(pristine.eval()(x), base.eval()(x))
    with pytest.raises(ValueError, match="do not fit"):
        other = DigitsCNN(channels=4)
        payload = torch.load(path, weights_only=True)
        payload["state_dict"] = {"head.lora_A.default.weight": payload["state_dict"]["head.lora_A.default.weight"]}
        load_adapter(other, payload)
    with pytest.raises(ValueError, match="no adapters"):
        save_adapter(DigitsCNN(channels=4), tmp_path / "none.adapter")


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": -2}, "rank"), ({"rank": 1.5}, "rank"),
    ({"alpha": 0}, "alpha"), ({"alpha": -1.0}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
    ({"method": "lorax"}, "method"), ({"method": "ia3", "dropout": 0.1}, "dropout"),
    ({"targets": []}, "targets"), ({"merge": "yes"}, "merge"),
])
def test_bad_arguments_are_refused_at_construction(kwargs: dict, match: str) -> None:
    args = {"targets": ["head"], **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        LoRA(**args)


def test_targets_matching_nothing_list_the_layers_before_any_step(tmp_path: Path) -> None:
    module = DigitsCNN(channels=4)
    t = trainer(tmp_path, callbacks=[LoRA(targets=["classifier"])])
    with pytest.raises(ValueError, match=r"classifier.*features\.0 \(Conv2d\).*head \(Linear\)"):
        t.fit(module, datamodule=data())
    assert t.global_step == 0 and not tuner_layers(module) and all(p.requires_grad for p in module.parameters())
    with pytest.raises(ValueError, match="head"):  # a layer the method cannot adapt (IA3 has no Conv1d / ReLU)
        apply_lora(DigitsCNN(channels=4), ["features.1"], method="ia3")


def test_techniques_that_record_parameter_names_before_lora_wraps_them(tmp_path: Path) -> None:
    # L1Penalty / WeightNoise record parameter names in their setup, which runs before LoRA's when they come first
    # in the list; the wrapped layers' weights live on under `base_layer` (regression: KeyError 'features.0.weight')
    from lightning_techniques import L1Penalty, WeightNoise

    module = DigitsCNN(channels=4)
    penalty, noise = L1Penalty(coefficient=1e-4), WeightNoise(std=0.01, seed=1)
    t = trainer(tmp_path, callbacks=[penalty, noise, LoRA(targets=["features.0", "head"], rank=2)])
    t.fit(module, datamodule=data())
    assert t.global_step == 3 and "features.0.weight" in penalty.parameter_names and penalty.last_coefficient > 0


@pytest.mark.parametrize("name", ["LoRA", "QLoRA"])
def test_test_stage_on_a_fresh_module_loads_an_adapted_checkpoint(name: str, tmp_path: Path) -> None:
    # trainer.test(fresh_module, ckpt_path=...) with the callback: the adapters are inserted in its setup, so the
    # adapted checkpoint loads strictly and the test computes what the trained module does
    from lightning_techniques import registry

    entry = registry.BY_NAME[name]
    assert entry.recipe is not None
    L.seed_everything(0)
    module = entry.recipe.build_module()
    t = trainer(tmp_path, steps=3, callbacks=[entry.build()], limit_test_batches=2)
    t.fit(module, datamodule=data())
    t.save_checkpoint(tmp_path / "adapted.ckpt")
    expected = t.test(module, datamodule=data(), verbose=False)[0]["test_loss"]
    fresh = entry.recipe.build_module()
    got = trainer(tmp_path, steps=3, callbacks=[entry.build()], limit_test_batches=2).test(
        fresh, datamodule=data(), ckpt_path=str(tmp_path / "adapted.ckpt"), weights_only=True, verbose=False)
    assert got[0]["test_loss"] == pytest.approx(expected, abs=1e-6)
