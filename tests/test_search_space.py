"""The search-space YAML: parsing, validation (before any trial), sampling through Optuna, writing into a config."""

from __future__ import annotations

import copy
from pathlib import Path

import optuna
import pytest
import yaml

from lightning_techniques.search.space import Parameter, SearchSpace, SearchSpaceError, get_path, resolve_path

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def base() -> dict:
    return yaml.safe_load((ROOT / "configs/search/digits.yaml").read_text())


def _trial(seed: int = 0) -> optuna.Trial:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()


def test_bundled_space_parses_checks_and_samples_every_kind(base: dict) -> None:
    space = SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml")
    space.check(base)
    assert space.metric == "val_acc" and space.direction == "maximize"
    assert space.is_conditional
    kinds = {p.name: p.type for p in space}
    assert kinds["model.init_args.channels"] == "int"
    assert kinds["trainer.callbacks.OptimizerCallback.name"] == "categorical"
    assert kinds["adamw_lr"] == "float" and space["adamw_lr"].log
    seen_optimizers = set()
    for seed in range(12):
        values = space.suggest(_trial(seed))
        optimizer = values["trainer.callbacks.OptimizerCallback.name"]
        seen_optimizers.add(optimizer)
        # only the branch taken is sampled
        assert ("sgd_lr" in values) == (optimizer == "sgd")
        assert ("adamw_lr" in values) == (optimizer == "adamw")
        assert values["model.init_args.channels"] in (8, 16, 24, 32)
        assert 0.0 <= values["trainer.callbacks.LRSchedule.warmup_fraction"] <= 0.3
        config = space.apply(base, values)
        optimizer_args = config["trainer"]["callbacks"][0]["init_args"]
        assert optimizer_args["name"] == optimizer
        assert optimizer_args["lr"] == values[f"{optimizer}_lr"]
        assert config["trainer"]["callbacks"][1]["init_args"]["warmup_fraction"] == \
            values["trainer.callbacks.LRSchedule.warmup_fraction"]
        assert config["model"]["init_args"]["channels"] == values["model.init_args.channels"]
    assert seen_optimizers == {"sgd", "adamw"}


def test_apply_leaves_the_base_config_unchanged(base: dict) -> None:
    before = copy.deepcopy(base)
    space = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 0.001, "high": 0.1}})
    new = space.apply(base, {"model.lr": 0.05})
    assert base == before
    assert new["model"]["init_args"] == {"channels": 16, "lr": 0.05}  # `model.lr` means model.init_args.lr


def test_sampled_configs_build_with_lightning_cli(base: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the space writes is what LightningCLI accepts: the techniques' own arguments reach the objects."""
    from lightning_techniques.demo.cli import TechniquesCLI

    space = SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml")
    values = space.suggest(_trial(3))
    config = space.apply(base, values)
    config["trainer"]["default_root_dir"] = str(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr("sys.argv", ["search"])  # LightningCLI warns when it gets args beside a command line
        cli = TechniquesCLI(args=config, run=False)
    schedule = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "LRSchedule")
    assert schedule.warmup_fraction == pytest.approx(values["trainer.callbacks.LRSchedule.warmup_fraction"])
    assert cli.model.hparams.channels == values["model.init_args.channels"]
    optimizer = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "OptimizerCallback")
    assert optimizer.name == values["trainer.callbacks.OptimizerCallback.name"]


def test_path_syntax_class_name_index_and_whole_class_path(base: dict) -> None:
    config = copy.deepcopy(base)
    config["trainer"]["callbacks"].append({"class_path": "lightning_techniques.LRSchedule",
                                           "init_args": {"warmup_fraction": 0.2}})
    assert get_path(config, "trainer.callbacks.LRSchedule[1].warmup_fraction") == 0.2
    assert get_path(config, "trainer.callbacks.LRSchedule[0].init_args.warmup_fraction") == 0.05
    assert get_path(config, "trainer.callbacks[0].name") == "adamw"
    assert get_path(config, "trainer.callbacks.0.name") == "adamw"
    assert get_path(config, "trainer.callbacks[lightning_techniques.OptimizerCallback].lr") == 0.003
    # an argument the config leaves to the class's default resolves (value None) because the class takes it
    assert get_path(config, "trainer.callbacks.OptimizerCallback.decay_norm_and_bias") is None
    assert get_path(config, "trainer.max_epochs") == 8
    assert get_path(config, "trainer.gradient_clip_val") is None  # a Trainer argument the config does not set
    with pytest.raises(KeyError, match=r"2 LRSchedule entries: pick one with LRSchedule\[0\]"):
        resolve_path(config, "trainer.callbacks.LRSchedule.warmup_fraction")
    with pytest.raises(KeyError, match=r"4 element"):
        resolve_path(config, "trainer.callbacks[5].x")


def test_single_callback_written_without_a_list() -> None:
    config = {"trainer": {"callbacks": {"class_path": "lightning_techniques.LRSchedule"}},
              "model": {"class_path": "lightning_techniques.demo.DigitsCNN"}}
    space = SearchSpace.from_dict({"trainer.callbacks.LRSchedule.warmup_fraction":
                                   {"type": "float", "low": 0.0, "high": 0.5}})
    space.check(config)
    new = space.apply(config, {"trainer.callbacks.LRSchedule.warmup_fraction": 0.25})
    assert new["trainer"]["callbacks"] == [{"class_path": "lightning_techniques.LRSchedule",
                                            "init_args": {"warmup_fraction": 0.25}}]


def test_unknown_paths_are_reported_together_with_what_exists(base: dict) -> None:
    space = SearchSpace.from_dict({
        "model.init_args.lrr": {"type": "float", "low": 0.001, "high": 0.1},
        "trainer.callbacks.LRSchedule.warmup_fractio": {"type": "float", "low": 0.0, "high": 0.3},
        "trainer.callbacks.EarlyStopping.patience": {"type": "int", "low": 1, "high": 5},
        "trainer.max_epoch": {"type": "int", "low": 1, "high": 5},
        "optimizer.lr": {"type": "float", "low": 0.001, "high": 0.1},
    })
    with pytest.raises(SearchSpaceError) as info:
        space.check(base)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "model.init_args.lrr: DigitsCNN (lightning_techniques.demo.DigitsCNN) takes no argument 'lrr'" in message
    assert "channels, dropout, lr, num_classes, optimizer, weight_decay" in message  # followed through **kwargs
    assert "LRSchedule (lightning_techniques.LRSchedule) takes no argument 'warmup_fractio'" in message
    assert "trainer.callbacks has no EarlyStopping; it has: OptimizerCallback, LRSchedule, LSUVInit" in message
    assert "lightning.Trainer takes no argument 'max_epoch'" in message
    assert "the config has no 'optimizer'; it has: seed_everything, torch_threads, trainer, model, data" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(("spec", "expected"), [
    ({"type": "float", "low": 0.1, "high": 0.01}, "inverted range: low=0.1 > high=0.01"),
    ({"type": "int", "low": 5, "high": 2}, "inverted range: low=5 > high=2"),
    ({"type": "float", "low": 0.1, "high": 0.1}, "empty range: low == high == 0.1"),
    ({"type": "int", "low": 3, "high": 3}, "empty range: low == high == 3"),
    ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "`log: true` needs low > 0"),
    ({"type": "float", "low": 0.0, "high": 1.0, "step": 0}, "`step` must be > 0"),
    ({"type": "float", "low": 0.1, "high": 1.0, "step": 0.1, "log": True}, "cannot be combined"),
    ({"type": "int", "low": 1, "high": 2.5}, "`high` must be an integer"),
    ({"type": "float", "low": "a", "high": 1.0}, "`low` must be a number, got 'a'"),
    ({"type": "float", "high": 1.0}, "needs `low` and `high` (missing `low`)"),
    ({"type": "flot", "low": 0, "high": 1}, "type='flot' is not allowed; allowed: float, int, categorical"),
    ({"low": 0, "high": 1}, "say the `type`"),
    ({"type": "float", "low": 0, "high": 1, "lgo": True}, "unknown key(s) lgo for a float parameter"),
    ({"choices": [1]}, "`choices` needs at least two values"),
    ({"choices": []}, "`choices` needs at least two values"),
    ({"choices": [1, 1]}, "`choices` has duplicates"),
    ({"choices": "ab"}, "`choices` must be a list"),
    ({"choices": ["a", "b"], "when": {"c": {"x": {"choices": [1, 2]}}}}, "`when` names 'c', which is not one"),
    ({"type": "float", "low": 0, "high": 1, "grid": [0.5, 2.0]}, "grid value 2.0 is outside the range"),
    ("0.1..1", "the spec must be a mapping"),
])
def test_bad_specs_fail_when_the_space_is_built(spec: object, expected: str) -> None:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.from_dict({"model.init_args.lr": spec})
    assert expected in str(info.value)
    assert "model.init_args.lr" in str(info.value)


def test_all_problems_are_listed_at_once() -> None:
    with pytest.raises(SearchSpaceError) as info:
        SearchSpace.from_dict({"a": {"type": "float", "low": 2, "high": 1},
                               "b": {"type": "int", "low": 1, "high": 1},
                               "c": {"choices": [1]}})
    assert info.value.problems[0].startswith("a: inverted range")
    assert info.value.problems[1].startswith("b: empty range")
    assert info.value.problems[2].startswith("c: `choices` needs")


def test_top_level_and_duplicate_names() -> None:
    with pytest.raises(SearchSpaceError, match="unknown top-level key.*metrc"):
        SearchSpace.from_dict({"parameters": {"a": {"choices": [1, 2]}}, "metrc": "val_acc"})
    with pytest.raises(SearchSpaceError, match="direction='max' is not allowed; allowed: minimize, maximize"):
        SearchSpace.from_dict({"parameters": {"a": {"choices": [1, 2]}}, "direction": "max"})
    with pytest.raises(SearchSpaceError, match="the space has no parameters"):
        SearchSpace.from_dict({"parameters": {}})
    # the same path in two branches without names: the default names collide
    with pytest.raises(SearchSpaceError, match="name 'x.lr' is used twice.*give each a distinct `name:`"):
        SearchSpace.from_dict({"x.opt": {"choices": ["a", "b"], "when": {
            "a": {"x.lr": {"type": "float", "low": 0.1, "high": 1}},
            "b": {"x.lr": {"type": "float", "low": 0.01, "high": 0.1}}}}})
    # a path set both by a parameter and by a branch that can be active with it
    with pytest.raises(SearchSpaceError, match="x.lr: set twice"):
        SearchSpace.from_dict({"x.lr": {"type": "float", "low": 0.1, "high": 1},
                               "x.opt": {"choices": ["a", "b"], "when": {
                                   "a": {"x.lr": {"name": "lr_a", "type": "float", "low": 0.1, "high": 1}}}}})


def test_yaml_text_scientific_notation_and_file_errors(tmp_path: Path) -> None:
    # PyYAML reads `1e-4` (no dot) as a string: accepted as the number it means
    space = SearchSpace.from_yaml("model.lr: {type: float, low: 1e-4, high: 1e-1, log: true}\n")
    assert space["model.lr"].low == pytest.approx(1e-4)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        SearchSpace.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(SearchSpaceError, match="not valid YAML"):
        SearchSpace.from_yaml("a: [1, 2\nb: 3")
    with pytest.raises(TypeError, match="space must be a SearchSpace"):
        SearchSpace.coerce(3)  # type: ignore[arg-type]


def test_structured_choices_round_trip_through_the_study() -> None:
    space = SearchSpace.from_dict({"trainer.callbacks.OptimizerCallback.optimizer_kwargs": {
        "choices": [{"betas": [0.9, 0.999]}, {"betas": [0.9, 0.98]}, None]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = []
    for _ in range(8):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        seen.append(values["trainer.callbacks.OptimizerCallback.optimizer_kwargs"])
        # Optuna stores the JSON text; the space gives back the YAML value
        assert space.from_study_params(trial.params) == values
    assert {"betas": [0.9, 0.98]} in seen or {"betas": [0.9, 0.999]} in seen


def test_grid_values_and_grid_sampler_covers_the_grid() -> None:
    space = SearchSpace.from_dict({
        "a": {"type": "int", "low": 1, "high": 3},
        "b": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.25},
        "c": {"choices": ["x", "y"]},
    })
    grid = space.grid()
    assert grid == {"a": [1, 2, 3], "b": [0.0, 0.25, 0.5], "c": ["x", "y"]}
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(grid, seed=0))
    study.optimize(lambda t: float(sum(v for v in space.suggest(t).values() if not isinstance(v, str))), n_trials=18)
    assert {(t.params["a"], t.params["b"], t.params["c"]) for t in study.trials} == {
        (a, b, c) for a in (1, 2, 3) for b in (0.0, 0.25, 0.5) for c in ("x", "y")}
    with pytest.raises(SearchSpaceError, match="give this float parameter a `step` or a `grid"):
        SearchSpace.from_dict({"a": {"type": "float", "low": 0.0, "high": 1.0}}).grid()
    assert SearchSpace.from_dict({"a": {"type": "float", "low": 0.0, "high": 1.0, "grid": [0.1, 0.9]}}).grid() == \
        {"a": [0.1, 0.9]}


def test_describe_is_plain_data_for_other_libraries() -> None:
    space = SearchSpace.from_dict({"m.opt": {"choices": ["a", "b"], "when": {
        "a": {"m.lr": {"name": "lr_a", "type": "float", "low": 0.1, "high": 1.0, "log": True}}}},
        "m.n": {"type": "int", "low": 1, "high": 4, "step": 1}})
    described = space.describe()
    assert described == [
        {"name": "m.opt", "path": "m.opt", "type": "categorical", "choices": ["a", "b"], "when": {
            "a": [{"name": "lr_a", "path": "m.lr", "type": "float", "low": 0.1, "high": 1.0, "log": True,
                   "step": None}]}},
        {"name": "m.n", "path": "m.n", "type": "int", "low": 1, "high": 4, "log": False, "step": 1},
    ]
    assert yaml.safe_load(yaml.safe_dump(described)) == described
    assert [p.name for p in space.active({"m.opt": "b"})] == ["m.opt", "m.n"]
    assert [p.name for p in space.active({"m.opt": "a"})] == ["m.opt", "lr_a", "m.n"]
    assert isinstance(space["lr_a"], Parameter)


def test_apply_rejects_incomplete_or_foreign_samples(base: dict) -> None:
    space = SearchSpace.from_dict({"model.lr": {"type": "float", "low": 0.001, "high": 0.1},
                                   "model.channels": {"type": "int", "low": 4, "high": 8}})
    with pytest.raises(KeyError, match="no value for active parameter.*model.channels"):
        space.apply(base, {"model.lr": 0.01})
    with pytest.raises(KeyError, match="does not have: model.dropout"):
        space.apply(base, {"model.lr": 0.01, "model.channels": 4, "model.dropout": 0.1})


def test_check_samples_parses_range_ends_and_every_choice_before_any_trial(base: dict) -> None:
    from lightning_techniques.search.space import check_samples

    check_samples(SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml"), base)
    # DigitsCNN wants an int
    with pytest.raises(SearchSpaceError) as info:
        check_samples(SearchSpace.from_dict({"model.init_args.channels": {"type": "float", "low": 4, "high": 8}}), base)
    message = str(info.value)
    assert "model.init_args.channels=4.0" in message and "Expected a <class 'int'>" in message
    # a choice outside the argument's Literal, found although the other choice parses
    with pytest.raises(SearchSpaceError) as info:
        check_samples(SearchSpace.from_dict({"trainer.callbacks.OptimizerCallback.name": {"choices": ["adamw", "sgdd"]}}),
                      base)
    assert len(info.value.problems) == 1
    assert "trainer.callbacks.OptimizerCallback.name='sgdd'" in str(info.value) and "Got value: sgdd" in str(info.value)
    broken = copy.deepcopy(base)
    broken["model"]["init_args"]["channels"] = "many"
    with pytest.raises(SearchSpaceError, match="the base config does not build"):
        check_samples(SearchSpace.from_dict({"model.lr": {"type": "float", "low": 0.01, "high": 0.1}}), broken)


def test_build_from_config_adds_callbacks_and_root_dir(base: dict, tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import Callback

    from lightning_techniques.search.space import build_from_config, load_config

    marker = Callback()
    trainer, model, data = build_from_config(load_config(ROOT / "configs/search/digits.yaml"), callbacks=[marker],
                                             default_root_dir=tmp_path / "trial_0")
    assert marker in trainer.callbacks
    assert trainer.default_root_dir == str(tmp_path / "trial_0")
    assert [type(cb).__name__ for cb in trainer.callbacks if type(cb).__module__.startswith("lightning_techniques")] \
        == ["OptimizerCallback", "LRSchedule", "LSUVInit"]
    assert type(model).__name__ == "DigitsCNN" and type(data).__name__ == "DigitsDataModule"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
