"""Code hygiene the contract needs: typed choices (a typo is rejected before anything runs) and docstring examples
that at least compile (and run, where they are self-contained).

``ruff check .`` and ``mypy lightning_techniques`` are run by ``.ci/run`` (they take minutes, not a unit test).
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from lightning_techniques import registry
from lightning_techniques.registry import REGISTRY, Technique
from lightning_techniques.testing import build_from_yaml

ROOT = Path(__file__).resolve().parents[1]


def _ids(entries: list[Technique]) -> list[str]:
    return [e.name for e in entries]


ENTRIES = list(REGISTRY)


# ------------------------------------------------------------------------------------------------ typed choices
def _own_inits(cls: type) -> list[Any]:
    """``__init__`` of ``cls`` and of its bases defined in this package (where ``check_choice`` calls live)."""
    inits = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None and klass.__module__.startswith("lightning_techniques"):
            inits.append(init)
    return inits


def _choice_checks(init: Any) -> list[tuple[str, list[Any]]]:
    """``(parameter, allowed values)`` of every ``check_choice("...", <parameter>, <choices>)`` in ``init``'s body
    whose checked value is an ``__init__`` parameter (or ``self.<parameter>``); the choices are evaluated in the
    defining module's namespace."""
    source = textwrap.dedent(inspect.getsource(init))
    params = set(inspect.signature(init).parameters)
    module_globals = sys.modules[init.__module__].__dict__
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "check_choice"):
            continue
        value = node.args[1]
        name = value.id if isinstance(value, ast.Name) else value.attr if isinstance(value, ast.Attribute) else None
        if name not in params:
            continue  # an element of a sequence argument (stages), checked per item
        choices = eval(compile(ast.Expression(node.args[2]), "<choices>", "eval"), module_globals)  # noqa: S307
        found.append((name, list(choices)))
    return found


def _literal_values(annotation: Any) -> set[Any] | None:
    """The values of a ``Literal[...]`` annotation, or of the Literal members of a union that has no plain ``str``
    member (``Literal[...] | Callable | None``: the string form is typed); ``None`` if strings are untyped."""
    if typing.get_origin(annotation) is Literal:
        return set(typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        literals = [a for a in members if typing.get_origin(a) is Literal]
        if literals and str not in members:
            return {v for a in literals for v in typing.get_args(a)}
    return None


CHOICE_PARAMS = [
    pytest.param(entry.cls, annotated, name, choices, id=f"{entry.name}.{name}@{annotated.__qualname__}")
    for entry in ENTRIES
    for init in _own_inits(entry.cls)
    for name, choices in _choice_checks(init)
    # the checking __init__ and every other one of the class that takes the argument (a subclass passing it on to
    # its base is what LightningCLI reads)
    for annotated in _own_inits(entry.cls)
    if name in inspect.signature(annotated).parameters
]


def test_choice_params_found() -> None:
    # the scan below must see the choice arguments (guards against the AST walk silently matching nothing)
    names = {(p.values[0].__name__, p.values[2]) for p in CHOICE_PARAMS}
    assert ("EarlyStopping", "best_weights_storage") in names
    assert ("EarlyStopping", "mode") in names
    assert len(CHOICE_PARAMS) >= 10


@pytest.mark.parametrize(("cls", "init", "name", "choices"), CHOICE_PARAMS)
def test_choice_arguments_are_literal(cls: type, init: Any, name: str, choices: list[Any]) -> None:
    """A constructor argument validated by ``check_choice`` is annotated ``Literal[<the same choices>]``, so
    LightningCLI/jsonargparse rejects a typo while parsing, before any model or data is built."""
    hints = typing.get_type_hints(init)
    annotation = hints.get(name)
    values = _literal_values(annotation)
    assert values is not None, f"{cls.__name__}({name}: {annotation}) is checked against {choices}: annotate Literal"
    assert values == set(choices), f"{cls.__name__}.{name}: Literal{sorted(values)} != allowed {sorted(choices)}"


@pytest.mark.parametrize(("name", "key", "typo"), [("EarlyStopping", "mode", "mni"),
                                                    ("ReduceLROnPlateau", "threshold_mode", "relative")])
def test_cli_rejects_typo_in_literal_choice(name: str, key: str, typo: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in a choice argument fails while LightningCLI parses the config (exit with a parse error naming the
    value), not later when the callback is instantiated (a plain ``str`` annotation let it through to a ValueError
    from ``check_choice``)."""
    config = yaml.safe_load((ROOT / "configs" / "callbacks" / f"{name}.yaml").read_text())
    extra = [f"--trainer.default_root_dir={tmp_path}"]
    cli = build_from_yaml(config, extra_args=extra)  # the config as shipped builds
    assert any(type(cb).__name__ == name for cb in cli.trainer.callbacks)
    spec = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith(f".{name}"))
    spec.setdefault("init_args", {})[key] = typo
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:  # jsonargparse reports the parse error and exits: nothing is built
        build_from_yaml(config, extra_args=extra)
    assert excinfo.value.code not in (0, None)
    assert typo in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- docstring examples
def _example(cls: type) -> str | None:
    """The ``Example::`` block of ``cls``'s docstring (dedented), or None."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Example::":
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and not following.startswith((" ", "\t")):
                    break
                block.append(following)
            return textwrap.dedent("\n".join(block)).strip("\n")
    return None


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_docstring_example_compiles(entry: Technique) -> None:
    example = _example(entry.cls)
    assert example, f"{entry.name}: the class docstring has no 'Example::' block"
    compile(example, f"<{entry.name} docstring example>", "exec")


def test_registry_entries_have_classes() -> None:
    assert registry.entries()  # the parametrizations above are not empty
    assert all(inspect.isclass(e.cls) for e in ENTRIES)


def _example_namespace(tmp_path: Path) -> dict[str, Any]:
    """What a self-contained example may use: the package's and the demo's public names, ``torch``, ``nn`` and ``L``
    (lightning) whose ``Trainer`` runs tiny (2 steps, 1 epoch, 2 batches, logs under ``tmp_path``)."""
    import lightning
    import torch
    from torch import nn

    import lightning_techniques
    import lightning_techniques.demo as demo

    def tiny_trainer(*args: Any, **kwargs: Any) -> lightning.Trainer:
        kwargs.update(max_epochs=1, max_steps=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1,
                      limit_predict_batches=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path),
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
        return lightning.Trainer(*args, **kwargs)

    fake_lightning = types.ModuleType("lightning")
    fake_lightning.__dict__.update(vars(lightning))
    fake_lightning.Trainer = tiny_trainer
    namespace: dict[str, Any] = {"L": fake_lightning, "torch": torch, "nn": nn}
    namespace.update({name: getattr(lightning_techniques, name) for name in lightning_techniques.__all__})
    namespace.update({name: getattr(demo, name) for name in demo.__all__})
    return namespace


def _free_names(example: str) -> set[str]:
    """Names an example reads without assigning them (builtins excluded)."""
    tree = ast.parse(example)
    stored = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    loaded = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loaded - stored - set(dir(builtins))


_NAMESPACE_NAMES = set(_example_namespace(Path(".")))
SELF_CONTAINED = [e for e in ENTRIES if (ex := _example(e.cls)) and not (_free_names(ex) - _NAMESPACE_NAMES)]


def test_most_examples_are_self_contained() -> None:
    # the exec test below must cover most techniques, not an empty or shrinking list
    assert len(SELF_CONTAINED) >= 25, [e.name for e in ENTRIES if e not in SELF_CONTAINED]


@pytest.mark.parametrize("entry", SELF_CONTAINED, ids=_ids(SELF_CONTAINED))
def test_docstring_example_runs(entry: Technique, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A self-contained ``Example::`` runs as written, with a tiny Trainer (2 steps)."""
    monkeypatch.chdir(tmp_path)
    example = _example(entry.cls)
    assert example is not None
    exec(compile(example, f"<{entry.name} docstring example>", "exec"), _example_namespace(tmp_path))  # noqa: S102
