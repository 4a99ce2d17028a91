"""The technique contract, checked generically over every entry of the technique registry
(:mod:`lightning_techniques.registry`): the registry is complete and consistent, the README table is generated from
it, every entry builds from YAML, resumes exactly in ``max_steps``- and in ``max_epochs``-bounded runs split
mid-epoch, and leaves the user's module exactly as it was after ``fit`` and after an exception raised mid-fit.

Combinations (pairs that take over the same mechanism, both orders; the whole compatible stack) are in
``tests/test_contract_combinations.py``; 2-process DDP over the registry in ``tests/test_contract_ddp.py``.
Hand-written tests in the other files cover only what is specific to a technique.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision

import lightning_techniques as lt
from lightning_techniques import registry
from lightning_techniques._internal.conflicts import LIGHTNING_CALLBACKS, MECHANISMS
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.registry import CONTRACT_POINTS, REGISTRY, SHARED_MECHANISMS, Technique
from lightning_techniques.testing import assert_exact_resume, build_from_yaml
from lightning_techniques.testing.contract import (
    assert_exact_resume_epochs,
    assert_fingerprints_equal,
    assert_picklable,
    declared_changes,
    kill_at_step,
    module_fingerprint,
    without_declared_changes,
)

ROOT = Path(__file__).resolve().parents[1]
TAKES_OVER_VOCABULARY = set(MECHANISMS)
assert set(SHARED_MECHANISMS) <= TAKES_OVER_VOCABULARY


def _ids(entries: list[Technique]) -> list[str]:
    return [entry.name for entry in entries]


def factories(entry: Technique) -> dict[str, Any]:
    """``make_module`` / ``make_datamodule`` / ``make_callbacks`` / ``make_plugins`` of an entry's tiny run."""
    recipe = entry.recipe
    assert recipe is not None
    if entry.kind == "plugin":
        return dict(make_module=recipe.build_module, make_datamodule=recipe.build_data,
                    make_callbacks=entry.companions, make_plugins=lambda: [entry.build()])
    return dict(make_module=recipe.build_module, make_datamodule=recipe.build_data,
                make_callbacks=lambda: [entry.build(), *entry.companions()], make_plugins=None)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, deterministic=True)
    base.update(kwargs)
    return L.Trainer(**base)


# ---------------------------------------------------------------------------------------------- the registry itself
def _public_techniques() -> set[str]:
    found = set()
    for name in lt.__all__:
        obj = getattr(lt, name)
        if isinstance(obj, type) and issubclass(obj, (Callback, Precision)):
            found.add(name)
    return found


def test_every_public_technique_has_exactly_one_entry() -> None:
    names = [entry.name for entry in REGISTRY]
    assert len(names) == len(set(names)), "an entry is listed twice"
    missing = _public_techniques() - set(names)
    assert not missing, f"public techniques without a registry entry: {sorted(missing)}"
    unknown = [name for name in names if name not in lt.__all__]
    assert not unknown, f"registry entries that are not exported from lightning_techniques: {unknown}"


@pytest.mark.parametrize("entry", REGISTRY, ids=_ids(list(REGISTRY)))
def test_entry_is_consistent(entry: Technique) -> None:
    assert entry.cls.__doc__ and len(entry.cls.__doc__) > 80, f"{entry.name} needs a docstring (paper, args, example)"
    assert entry.summary and entry.paper and re.search(r"\d{4}", entry.paper), f"{entry.name}: paper with its year"
    for point, reason in entry.exceptions.items():
        assert point in CONTRACT_POINTS, f"{entry.name}: exception for unknown contract point {point!r}"
        assert len(reason) > 20, f"{entry.name}: the exception for {point!r} needs its reason"
    if entry.recipe is None:
        assert set(entry.exceptions) == set(CONTRACT_POINTS), f"{entry.name}: no recipe, so every point needs a reason"
    unknown = entry.takes_over - TAKES_OVER_VOCABULARY
    assert not unknown, f"{entry.name}.takes_over names unknown mechanisms {sorted(unknown)}"
    bad = [name for name in entry.conflicts_with if name not in registry.BY_NAME and name not in LIGHTNING_CALLBACKS]
    assert not bad, f"{entry.name}.conflicts_with names unregistered classes {bad}"
    assert (ROOT / "notebooks" / f"{entry.notebook}.ipynb").exists(), f"{entry.name}: notebook {entry.notebook} missing"


def test_readme_table_is_generated_from_the_registry() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- techniques-table -->")[1].split("<!-- /techniques-table -->")[0].strip()
    assert table == registry.readme_table(), (
        "README.md's technique table is out of date: regenerate it with `python -m lightning_techniques.registry --update-readme`"
    )


# ---------------------------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("entry", registry.entries("yaml"), ids=_ids(registry.entries("yaml")))
def test_builds_from_yaml(entry: Technique, tmp_path: Path) -> None:
    folder = "plugins" if entry.kind == "plugin" else "callbacks"
    path = ROOT / "configs" / folder / f"{entry.name}.yaml"
    assert path.exists(), f"add {path.relative_to(ROOT)}"
    config = yaml.safe_load(path.read_text())
    cli = build_from_yaml(path, extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    if entry.kind == "plugin":
        built = [cli.trainer.precision_plugin] if isinstance(cli.trainer.precision_plugin, entry.cls) else []
        listed = config["trainer"]["plugins"]
    else:
        built = [cb for cb in cli.trainer.callbacks if type(cb) is entry.cls]
        listed = config["trainer"]["callbacks"]
    assert built, f"{entry.name} not built from {path.name}"
    listed = listed if isinstance(listed, list) else [listed]
    spec = next(e for e in listed if e["class_path"].rsplit(".", 1)[-1] == entry.name)
    for key, value in (spec.get("init_args") or {}).items():
        if isinstance(value, (int, float, str, bool)) and value != "auto" and hasattr(built[0], key):
            assert getattr(built[0], key) == value, f"{entry.name}.{key}: YAML {value!r} -> {getattr(built[0], key)!r}"


# ------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("entry", registry.entries("resume_steps"), ids=_ids(registry.entries("resume_steps")))
def test_exact_resume_max_steps(entry: Technique, tmp_path: Path) -> None:
    recipe = entry.recipe
    assert recipe is not None
    assert_exact_resume(**factories(entry), tmp_path=tmp_path, total_steps=recipe.steps, split_step=recipe.split,
                        trainer_kwargs=recipe.trainer)


@pytest.mark.parametrize("entry", registry.entries("resume_epochs"), ids=_ids(registry.entries("resume_epochs")))
def test_exact_resume_max_epochs_killed_mid_epoch(entry: Technique, tmp_path: Path) -> None:
    recipe = entry.recipe
    assert recipe is not None
    assert 0 < recipe.epoch_split % recipe.epoch_batches or "accumulation" in entry.takes_over, "split must be mid-epoch"
    assert_exact_resume_epochs(**factories(entry), tmp_path=tmp_path, max_epochs=recipe.epochs,
                               limit_train_batches=recipe.epoch_batches, kill_step=recipe.epoch_split,
                               trainer_kwargs=recipe.trainer)


# --------------------------------------------------------------------------------------------- module untouched
_BASELINES: dict[tuple[Any, ...], tuple[dict, dict, tuple, tuple]] = {}


def _fit_fingerprints(entry: Technique, with_technique: bool, tmp_path: Path) -> tuple[dict, dict, tuple, tuple]:
    """Fingerprints of the recipe's module after a full fit and after a fit killed at step 2, and the module paths
    the techniques declared they changed in each (``changes_module``/``changed_paths``: fine-tuning adapters)."""
    recipe = entry.recipe
    assert recipe is not None
    made = factories(entry)
    prints, changed = [], []
    for kill in (False, True):
        L.seed_everything(0, verbose=False)
        module, data = made["make_module"](), made["make_datamodule"]()
        callbacks = made["make_callbacks"]() if with_technique else []
        plugins = made["make_plugins"]() if with_technique and made["make_plugins"] else None
        if kill:
            callbacks.append(kill_at_step(2))
        trainer = quiet_trainer(max_steps=recipe.steps, callbacks=callbacks, plugins=plugins,
                                default_root_dir=str(tmp_path / f"{with_technique}-{kill}"), **recipe.trainer)
        try:
            trainer.fit(module, datamodule=data)
        except Exception as err:  # noqa: BLE001 - only the simulated kill is expected
            assert kill and "killed after optimizer step" in str(err), f"unexpected {type(err).__name__}: {err}"
        else:
            assert not kill, "the kill did not happen"
        assert_picklable(module)
        prints.append(module_fingerprint(module))
        changed.append(declared_changes(callbacks + list(plugins or [])))
    return prints[0], prints[1], changed[0], changed[1]


@pytest.mark.parametrize("entry", registry.entries("module_untouched"), ids=_ids(registry.entries("module_untouched")))
def test_module_untouched_after_fit_and_after_an_exception(entry: Technique, tmp_path: Path) -> None:
    recipe = entry.recipe
    assert recipe is not None
    key = (recipe.module, tuple(sorted(recipe.module_kwargs.items())), recipe.data, recipe.steps,
           tuple(sorted(recipe.trainer.items())))
    if key not in _BASELINES:
        _BASELINES[key] = _fit_fingerprints(entry, False, tmp_path / "baseline")
    clean_fit, clean_killed, _, _ = _BASELINES[key]
    fit, killed, changed_fit, changed_killed = _fit_fingerprints(entry, True, tmp_path / "technique")
    # a technique that changes the module on purpose (``changes_module``) may differ only at its declared paths
    assert bool(changed_fit) == entry.changes_module, (
        f"{entry.name}: changes_module={entry.changes_module} but changed_paths={changed_fit}")
    assert_fingerprints_equal(clean_fit, fit, f"{entry.name}: module after fit", changed_paths=changed_fit)
    assert_fingerprints_equal(clean_killed, killed, f"{entry.name}: module after an exception mid-fit",
                              changed_paths=changed_killed)


class _SwapHead(Callback):
    """A throwaway technique that changes the module on purpose and declares it: the head becomes a new layer
    (frozen weight), and (``stray=True``) it also leaves a hook elsewhere - which the contract must catch."""

    changes_module = True

    def __init__(self, stray: str = "") -> None:
        self.stray = stray
        self._changed: tuple[str, ...] = ()

    @property
    def changed_paths(self) -> tuple[str, ...]:
        return self._changed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        old = pl_module.head
        pl_module.head = torch.nn.Sequential(torch.nn.Linear(old.in_features, old.out_features))
        pl_module.head[0].weight.requires_grad_(False)
        self._changed = ("head",)
        if self.stray == "hook":
            pl_module.features[0].register_forward_hook(lambda *args: None)
        elif self.stray == "frozen":
            pl_module.features[0].weight.requires_grad_(False)
        elif self.stray == "attribute":
            pl_module.adapter_note = "left behind"


@pytest.mark.parametrize("stray", ["", "hook", "frozen", "attribute"])
def test_declared_change_allows_only_the_declared_paths(stray: str, tmp_path: Path) -> None:
    def fit(callbacks: list[Callback]) -> dict:
        L.seed_everything(0, verbose=False)
        module = DigitsCNN(channels=4)
        quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=callbacks, default_root_dir=str(tmp_path)).fit(
            module, datamodule=DigitsDataModule(batch_size=32))
        return module_fingerprint(module)

    clean = fit([])
    swap = _SwapHead(stray)
    changed = fit([swap])
    assert declared_changes([swap, Callback()]) == ("head",)
    with pytest.raises(AssertionError):  # without the declaration, the change itself is a difference
        assert_fingerprints_equal(clean, changed)
    if not stray:
        assert_fingerprints_equal(clean, changed, changed_paths=declared_changes([swap]))
    else:
        with pytest.raises(AssertionError):
            assert_fingerprints_equal(clean, changed, changed_paths=declared_changes([swap]))
    # a path prefix is not a parent: "head" does not cover a sibling named "header"
    assert not declared_changes([]) and "header.weight" in without_declared_changes(
        {"<state_dict keys>": ["head.weight", "header.weight"]}, ("head",))["<state_dict keys>"]


def test_one_version_string() -> None:
    from importlib.metadata import version

    assert version("lightning_techniques") == lt.__version__, "pyproject takes its version from __version__"
