"""Combinations, checked generically over the technique registry: every pair of techniques that take over the same
mechanism (``configure_optimizers``, train sampler, batch transforms, criterion, loss terms, precision) in both
callback orders - fit, exact resume, module untouched - and declared conflicts refused before any step; then the
stack of every mutually compatible technique in one run, in both orders, resumed exactly in a ``max_steps`` and a
``max_epochs`` run. (The same stack under 2-process DDP is in ``tests/test_contract_ddp.py``.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lightning_techniques import registry
from lightning_techniques.registry import Recipe, Technique
from lightning_techniques.testing import assert_exact_resume
from lightning_techniques.testing.contract import (
    assert_exact_resume_epochs,
    assert_fingerprints_equal,
    assert_picklable,
    declared_changes,
    module_fingerprint,
)


def _quiet(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    base.update(kwargs)
    return L.Trainer(**base)


def merged_recipe(techniques: list[Technique]) -> Recipe:
    """One tiny run for several techniques: the first non-default module/data, the union of data and Trainer
    arguments (imbalanced data when any needs it, evaluation every 2 steps when any logs at validation)."""
    default = Recipe()
    module, module_kwargs, data, data_kwargs, trainer = default.module, dict(default.module_kwargs), default.data, {}, {}
    for entry in techniques:
        recipe = entry.recipe
        assert recipe is not None
        if (recipe.module, dict(recipe.module_kwargs)) != (default.module, dict(default.module_kwargs)) and (
                module, module_kwargs) == (default.module, dict(default.module_kwargs)):
            module, module_kwargs = recipe.module, dict(recipe.module_kwargs)  # e.g. a dropout CNN for RNG state
        elif recipe.module == module:  # same model class: add the options it needs (e.g. batch_norm=True)
            module_kwargs.update({k: v for k, v in recipe.module_kwargs.items() if k not in module_kwargs})
        if recipe.data != default.data:
            data = recipe.data
        data_kwargs.update(recipe.data_kwargs)
        for key, value in recipe.trainer.items():
            if key == "limit_val_batches" and trainer.get(key):
                continue  # evaluation wanted by one technique wins over "no evaluation" of another
            trainer[key] = value
    return Recipe(module=module, module_kwargs=module_kwargs, data=data, data_kwargs=data_kwargs or {"batch_size": 32},
                  trainer=trainer)


def split(techniques: list[Technique]) -> tuple[Any, Any]:
    """``make_callbacks`` and ``make_plugins`` for techniques in this order."""
    def make_callbacks() -> list[Callback]:
        built = [entry.build() for entry in techniques if entry.kind == "callback"]
        present = {entry.name for entry in techniques}
        for entry in techniques:  # the techniques a recipe needs beside its own (once, when not already in the run)
            for name in entry.recipe.with_ if entry.recipe else ():
                if name not in present:
                    built.append(registry.BY_NAME[name].build())
                    present.add(name)
        return built

    def make_plugins() -> list[Any]:
        return [entry.build() for entry in techniques if entry.kind == "plugin"]

    return make_callbacks, make_plugins


def conflicting(a: Technique, b: Technique) -> bool:
    return b.name in a.conflicts_with or a.name in b.conflicts_with


def fit_fingerprint(recipe: Recipe, techniques: list[Technique], tmp_path: Path,
                    steps: int = 4) -> tuple[dict, tuple[str, ...]]:
    """The module's fingerprint after a ``steps``-step run with ``techniques``, and the module paths they declared
    they changed (``changes_module``/``changed_paths``: fine-tuning adapters)."""
    make_callbacks, make_plugins = split(techniques)
    L.seed_everything(0, verbose=False)
    module = recipe.build_module()
    callbacks, plugins = make_callbacks(), make_plugins()
    trainer = _quiet(max_steps=steps, callbacks=callbacks, plugins=plugins or None,
                     default_root_dir=str(tmp_path), **recipe.trainer)
    trainer.fit(module, datamodule=recipe.build_data())
    stops = any("stopping" in entry.takes_over for entry in techniques)  # EarlyStopping may end the run sooner
    assert trainer.global_step == steps or (stops and trainer.should_stop), trainer.global_step
    assert_picklable(module)
    return module_fingerprint(module), declared_changes(callbacks + plugins)


class _RefuseAtSetup(Callback):
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        raise RuntimeError("baseline refusal")


PAIRS = registry.combination_pairs()


def test_combination_pairs_cover_every_shared_mechanism_with_two_owners() -> None:
    owners: dict[str, list[str]] = {}
    for entry in registry.entries("combinations"):
        for mechanism in entry.takes_over & set(registry.SHARED_MECHANISMS):
            owners.setdefault(mechanism, []).append(entry.name)
    shared = {m for m, names in owners.items() if len(names) > 1}
    assert {"configure_optimizers", "train_sampler", "batch_transform", "criterion"} <= shared, owners
    pairs = {(a.name, b.name) for a, b in PAIRS}
    for names in owners.values():
        for a in names:
            for b in names:
                assert a == b or (a, b) in pairs


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{a.name}+{b.name}" for a, b in PAIRS])
def test_pair(pair: tuple[Technique, Technique], tmp_path: Path) -> None:
    first, second = pair
    recipe = merged_recipe([first, second])
    make_callbacks, make_plugins = split([first, second])
    if conflicting(first, second):
        # refused at setup, before any step, and nothing is left on the module
        L.seed_everything(0, verbose=False)
        module = recipe.build_module()
        trainer = _quiet(max_steps=4, callbacks=make_callbacks(), plugins=make_plugins() or None,
                         default_root_dir=str(tmp_path / "refused"), **recipe.trainer)
        with pytest.raises((ValueError, RuntimeError, TypeError)) as refused:
            trainer.fit(module, datamodule=recipe.build_data())
        assert first.name in str(refused.value) or second.name in str(refused.value), str(refused.value)
        assert trainer.global_step == 0
        baseline_module = recipe.build_module()
        baseline = _quiet(max_steps=4, callbacks=[_RefuseAtSetup()], default_root_dir=str(tmp_path / "base"),
                          **recipe.trainer)
        with pytest.raises(RuntimeError, match="baseline refusal"):
            baseline.fit(baseline_module, datamodule=recipe.build_data())
        assert_fingerprints_equal(module_fingerprint(baseline_module), module_fingerprint(module), "refused pair")
        assert_picklable(module)
        return
    straight = assert_exact_resume(recipe.build_module, recipe.build_data, make_callbacks, tmp_path / "resume",
                                   total_steps=6, split_step=3, trainer_kwargs=recipe.trainer, make_plugins=make_plugins)
    assert_picklable(straight["module"])
    assert_fingerprints_equal(clean_fingerprint(recipe, tmp_path), module_fingerprint(straight["module"]),
                              "module after fit", changed_paths=declared_changes(straight["callbacks"]))


_CLEAN: dict[str, dict] = {}


def clean_fingerprint(recipe: Recipe, tmp_path: Path) -> dict:
    """The module's fingerprint after the same 6-step run with no technique (cached per recipe)."""
    key = repr(recipe)
    if key not in _CLEAN:
        _CLEAN[key] = fit_fingerprint(recipe, [], tmp_path / "clean", steps=6)[0]
    return _CLEAN[key]


# ------------------------------------------------------------------------------------------------------ the stack
STACK_EXCLUDED = {
    # the stack runs on the demo CNN; attention maps need an attention model (their own entry and pairs cover them)
    "AttentionMapLogger": "needs an attention model; the stack runs on the demo CNN",
}


# the stack's runs must reach their end to be compared with each other (EarlyStopping's own entry stops early)
STACK_KWARGS = {"EarlyStopping": {"patience": 1000}}


def compatible_stack() -> list[Technique]:
    """Greedy, in registry order: every runnable entry that conflicts with none already chosen."""
    chosen: list[Technique] = []
    for entry in registry.entries("combinations"):
        if entry.name in STACK_EXCLUDED:
            continue
        if any(conflicting(entry, other) for other in chosen):
            continue
        if entry.name in STACK_KWARGS:
            assert entry.recipe is not None
            entry = dataclasses.replace(entry, recipe=dataclasses.replace(
                entry.recipe, kwargs={**entry.recipe.kwargs, **STACK_KWARGS[entry.name]}))
        chosen.append(entry)
    return chosen


STACK = compatible_stack()


def stack_recipe(techniques: list[Technique]) -> Recipe:
    """The stack's tiny run. With ``AccumulationScheduler`` in it (k=2 from step 2), optimizer steps end at batches
    1, 2, 4, 6, 8, 10: validating every 3 batches keeps the split (step 3, batch 4) away from a validation (Lightning
    skips a validation due right after a mid-epoch checkpoint on resume), and 6 batches an epoch put step 5 mid-epoch.
    """
    return dataclasses.replace(merged_recipe(techniques), trainer={"val_check_interval": 3, "limit_val_batches": 1},
                               epoch_batches=6, epoch_split=5)


def test_stack_is_large() -> None:
    names = {entry.name for entry in STACK}
    assert len(STACK) >= 20, names
    refused = [entry.name for entry in registry.entries("combinations") if entry.name not in names]
    for name in refused:
        assert name in STACK_EXCLUDED or any(conflicting(registry.BY_NAME[name], other) for other in STACK), name


@pytest.mark.slow
@pytest.mark.parametrize("order", ["forward", "reversed"])
def test_stack_fits_resumes_and_leaves_the_module_untouched(order: str, tmp_path: Path) -> None:
    techniques = STACK if order == "forward" else list(reversed(STACK))
    recipe = stack_recipe(techniques)
    clean, _ = fit_fingerprint(recipe, [], tmp_path / "clean")
    stacked, changed = fit_fingerprint(recipe, techniques, tmp_path / "stack")
    assert_fingerprints_equal(clean, stacked, f"stack ({order})", changed_paths=changed)
    make_callbacks, make_plugins = split(techniques)
    if order == "forward":
        assert_exact_resume(recipe.build_module, recipe.build_data, make_callbacks, tmp_path / "steps",
                            total_steps=recipe.steps, split_step=recipe.split, trainer_kwargs=recipe.trainer,
                            make_plugins=make_plugins)
    else:
        assert_exact_resume_epochs(recipe.build_module, recipe.build_data, make_callbacks, tmp_path / "epochs",
                                   max_epochs=recipe.epochs, limit_train_batches=recipe.epoch_batches,
                                   kill_step=recipe.epoch_split, trainer_kwargs=recipe.trainer,
                                   make_plugins=make_plugins)
