"""A hyperparameter search space written in YAML, whose parameters are paths into a LightningCLI config.

One space serves every search driver: :func:`~lightning_techniques.search.optuna_search` samples it through an
Optuna trial (:meth:`SearchSpace.suggest`), the Ray Tune driver converts its plain description
(:meth:`SearchSpace.describe`), and :meth:`SearchSpace.apply` writes a sample into a copy of the config, which
then builds the trial's Trainer, model and datamodule exactly as ``lightning-techniques fit --config`` would.

The file::

    metric: val_acc          # optional: what to optimise (a name the module logs) ...
    direction: maximize      # ... and which way; both can be given to the driver / CLI instead
    parameters:
      model.init_args.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
      model.init_args.channels: {type: int, low: 8, high: 32, step: 8}
      data.init_args.batch_size: {choices: [32, 64, 128]}
      trainer.callbacks.LRSchedule.warmup_fraction: {type: float, low: 0.0, high: 0.3}
      trainer.callbacks.OptimizerCallback.name:
        choices: [sgd, adamw]
        when:                # conditional parameters: sampled only when the choice above is taken
          sgd:
            trainer.callbacks.OptimizerCallback.momentum: {type: float, low: 0.0, high: 0.95}
          adamw:
            trainer.callbacks.OptimizerCallback.weight_decay: {type: float, low: 1.0e-5, high: 0.1, log: true}

(a file holding only the ``parameters`` mapping, without the key, is read the same way).

**Parameters.** Each key of ``parameters`` is a *path* (below); its value says how to sample it:

* ``type: float`` with ``low``, ``high``, optional ``log: true`` (log-uniform; ``low`` > 0) or ``step``
  (a grid of ``low + k * step``);
* ``type: int`` with ``low``, ``high`` (both included), optional ``step`` or ``log: true``;
* ``choices: [...]`` (``type: categorical`` may be written or left out): any YAML values, lists and mappings
  included; optional ``when: {choice: {path: spec, ...}}`` - parameters sampled only when that choice is taken
  (nested to any depth);
* optional ``name``: the parameter's name in the study (default: its path). The same path may appear in two
  branches of one ``when`` (e.g. a learning-rate range per optimizer) if each has its own ``name``;
* optional ``grid: [...]``: the values the grid sampler tries (default: the choices, the ints of the range, or
  the floats of a ``step`` grid; a float range without ``step`` needs ``grid`` for the grid sampler).

**Paths** are dot-separated keys of the config, with two conveniences for LightningCLI's ``class_path`` /
``init_args`` nodes:

* in a node that names a class (has ``class_path``), a key other than ``class_path`` / ``init_args`` means
  ``init_args.<key>``: ``model.lr`` is ``model.init_args.lr`` (both are accepted);
* in a list of such nodes (``trainer.callbacks``) an element is picked by its class name - the last part of its
  ``class_path`` (``LRSchedule``), or the whole ``class_path`` in brackets when two classes share a short name -
  by ``Name[i]`` for the i-th of several of the same class (from 0), or by its position ``[i]``:
  ``trainer.callbacks.LRSchedule.warmup_fraction``, ``trainer.callbacks.EarlyStopping[1].patience``,
  ``trainer.callbacks[0].tolerance``.

A path must end at an argument the named class accepts (its ``__init__`` signature, following ``**kwargs`` up to
the base classes that receive them), at a ``Trainer`` argument under ``trainer``, or at a key the config already
has. Anything else - a callback the config does not list, an argument the class does not take - is an error that
names the path, the step that failed and what exists there, raised when the space is checked against the base
config (:meth:`SearchSpace.check`), before any trial.

Errors in the space itself (an empty or inverted range, ``log`` with ``low <= 0``, an unknown key, fewer than two
choices) are collected and raised together as one :class:`SearchSpaceError` (a ``ValueError``) when the space is
built.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ParamType = Literal["float", "int", "categorical"]
PARAM_TYPES: tuple[str, ...] = ("float", "int", "categorical")
DIRECTIONS: tuple[str, ...] = ("minimize", "maximize")
_SPEC_KEYS = {
    "float": {"type", "low", "high", "log", "step", "name", "grid"},
    "int": {"type", "low", "high", "log", "step", "name", "grid"},
    "categorical": {"type", "choices", "when", "name", "grid"},
}
_TOP_KEYS = {"parameters", "metric", "direction"}
_SEGMENT = re.compile(r"^(?P<key>[^\[\]]*)(?:\[(?P<index>[^\[\]]+)\])?$")


class SearchSpaceError(ValueError):
    """A search space that cannot be used: every problem found, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid search space ({len(self.problems)} problem(s)):\n{lines}")


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _choice_key(value: Any) -> Any:
    """What Optuna stores for a choice: the value itself when Optuna accepts it, else its JSON text."""
    return value if _primitive(value) else json.dumps(value, sort_keys=True)


@dataclass(frozen=True)
class Parameter:
    """One parameter of a :class:`SearchSpace` (built by :meth:`SearchSpace.from_dict`; plain data)."""

    path: str
    type: ParamType
    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: Mapping[Any, tuple[Parameter, ...]] = field(default_factory=dict)
    grid: tuple[Any, ...] | None = None

    def branch(self, value: Any) -> tuple[Parameter, ...]:
        """The conditional parameters active when this categorical parameter takes ``value``."""
        for choice, params in self.when.items():
            if _choice_key(choice) == _choice_key(value):
                return params
        return ()

    def grid_values(self) -> list[Any]:
        """The values a grid search tries for this parameter."""
        if self.grid is not None:
            return list(self.grid)
        if self.type == "categorical":
            return list(self.choices)
        assert self.low is not None and self.high is not None
        if self.type == "int":
            step = int(self.step or 1)
            if self.log and self.step is None:
                return list(range(int(self.low), int(self.high) + 1))
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step is None:
            raise SearchSpaceError([
                f"{self.name}: the grid sampler needs the values to try: give this float parameter a `step` or a "
                f"`grid: [...]` list"
            ])
        count = int(math.floor((float(self.high) - float(self.low)) / float(self.step) + 1e-9)) + 1
        return [float(self.low) + k * float(self.step) for k in range(count)]

    def describe(self) -> dict[str, Any]:
        """Plain description (see :meth:`SearchSpace.describe`)."""
        out: dict[str, Any] = {"name": self.name, "path": self.path, "type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
            if self.when:
                out["when"] = {choice: [p.describe() for p in params] for choice, params in self.when.items()}
        else:
            out.update(low=self.low, high=self.high, log=self.log, step=self.step)
        if self.grid is not None:
            out["grid"] = list(self.grid)
        return out


def _number(problems: list[str], where: str, key: str, value: Any, integer: bool) -> float | int | None:
    """``value`` as a number, or None after recording a problem (YAML 1.1 reads ``1e-4`` as a string: accepted)."""
    if isinstance(value, bool) or value is None:
        problems.append(f"{where}: `{key}` must be a number, got {value!r}")
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            problems.append(f"{where}: `{key}` must be a number, got {value!r}")
            return None
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        problems.append(f"{where}: `{key}` must be a finite number, got {value!r}")
        return None
    if integer:
        if float(value) != int(value):
            problems.append(f"{where}: `{key}` must be an integer for an int parameter, got {value!r}")
            return None
        return int(value)
    return float(value)


def _parse_param(path: Any, spec: Any, problems: list[str]) -> Parameter | None:
    if not isinstance(path, str) or not path or any(not part for part in _split(path)):
        problems.append(f"{path!r}: a parameter path must be a non-empty dot-separated string like "
                        f"'model.init_args.lr'")
        return None
    where = path
    if not isinstance(spec, Mapping):
        problems.append(f"{where}: the spec must be a mapping like {{type: float, low: 0.001, high: 0.1}} or "
                        f"{{choices: [...]}}, got {spec!r}")
        return None
    kind = spec.get("type", "categorical" if "choices" in spec else None)
    if kind is None:
        problems.append(f"{where}: say the `type` (one of {', '.join(PARAM_TYPES)}) or give `choices`")
        return None
    if kind not in PARAM_TYPES:
        problems.append(f"{where}: type={kind!r} is not allowed; allowed: {', '.join(PARAM_TYPES)}")
        return None
    unknown = sorted(set(map(str, spec)) - _SPEC_KEYS[kind])
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)} for a {kind} parameter; allowed: "
                        f"{', '.join(sorted(_SPEC_KEYS[kind]))}")
    name = spec.get("name", path)
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: `name` must be a non-empty string, got {name!r}")
        name = path
    grid = spec.get("grid")
    if grid is not None and (not isinstance(grid, (list, tuple)) or not grid):
        problems.append(f"{where}: `grid` must be a non-empty list of values, got {grid!r}")
        grid = None
    before = len(problems)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)):
            problems.append(f"{where}: `choices` must be a list, got {choices!r}")
            return None
        if len(choices) < 2:
            problems.append(f"{where}: `choices` needs at least two values (got {list(choices)!r}); a single value "
                            f"belongs in the config itself")
        keys = [_choice_key(c) for c in choices]
        if len(set(map(repr, keys))) != len(keys):
            problems.append(f"{where}: `choices` has duplicates: {list(choices)!r}")
        when_spec = spec.get("when", {}) or {}
        when: dict[Any, tuple[Parameter, ...]] = {}
        if not isinstance(when_spec, Mapping):
            problems.append(f"{where}: `when` must map choices to parameters, got {when_spec!r}")
        else:
            for choice, sub in when_spec.items():
                if not any(_choice_key(choice) == k for k in keys):
                    problems.append(f"{where}: `when` names {choice!r}, which is not one of the choices "
                                    f"{list(choices)!r}")
                    continue
                if not isinstance(sub, Mapping) or not sub:
                    problems.append(f"{where}: `when.{choice}` must be a non-empty mapping of path: spec, got {sub!r}")
                    continue
                params = tuple(p for p in (_parse_param(k, v, problems) for k, v in sub.items()) if p is not None)
                when[choice] = params
        if grid is not None and any(not any(_choice_key(g) == k for k in keys) for g in grid):
            problems.append(f"{where}: every `grid` value must be one of the choices {list(choices)!r}")
        if len(problems) > before:
            return None
        return Parameter(path=path, type="categorical", name=name, choices=tuple(choices), when=when,
                         grid=None if grid is None else tuple(grid))
    integer = kind == "int"
    for key in ("low", "high"):
        if key not in spec:
            problems.append(f"{where}: a {kind} parameter needs `low` and `high` (missing `{key}`)")
    if len(problems) > before:
        return None
    low = _number(problems, where, "low", spec["low"], integer)
    high = _number(problems, where, "high", spec["high"], integer)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{where}: `log` must be true or false, got {log!r}")
        log = False
    step = None if spec.get("step") is None else _number(problems, where, "step", spec["step"], integer)
    if low is None or high is None or len(problems) > before:
        return None
    if low > high:
        problems.append(f"{where}: inverted range: low={low!r} > high={high!r}")
    elif low == high:
        problems.append(f"{where}: empty range: low == high == {low!r}; a single value belongs in the config itself")
    if log and low <= 0:
        problems.append(f"{where}: `log: true` needs low > 0, got low={low!r}")
    if step is not None:
        if step <= 0:
            problems.append(f"{where}: `step` must be > 0, got {step!r}")
        elif log and not (integer and step == 1):
            problems.append(f"{where}: `step` and `log: true` cannot be combined (Optuna samples either a grid or a "
                            f"log scale)")
        elif low < high and step > high - low:
            problems.append(f"{where}: `step`={step!r} is larger than the range {low!r}..{high!r}: one value only")
    if grid is not None:
        for value in grid:
            number = _number(problems, where, "grid", value, integer)
            if number is not None and not low <= number <= high:
                problems.append(f"{where}: grid value {value!r} is outside the range {low!r}..{high!r}")
    if len(problems) > before:
        return None
    return Parameter(path=path, type=kind, name=name, low=low, high=high, log=log, step=step,
                     grid=None if grid is None else tuple(grid))


def _all_paths(param: Parameter) -> set[str]:
    paths = {param.path}
    for params in param.when.values():
        for sub in params:
            paths |= _all_paths(sub)
    return paths


def _check_scope(params: Sequence[Parameter], inherited: set[str], problems: list[str], where: str) -> None:
    """Two parameters that can be active together must not set the same path."""
    seen: dict[str, str] = {}
    for param in params:
        for path in sorted(_all_paths(param)):
            if path in inherited:
                problems.append(f"{path}: set twice ({where}: also set by an enclosing parameter)")
            elif path in seen and seen[path] != param.name:
                problems.append(f"{path}: set by two parameters that can be active together ({seen[path]} and "
                                f"{param.name})")
            seen.setdefault(path, param.name)
    scope = inherited | {p.path for p in params}
    for param in params:
        for choice, sub in param.when.items():
            _check_scope(sub, scope, problems, f"under {param.name}={choice!r}")


def _walk(params: Sequence[Parameter]) -> Iterator[Parameter]:
    for param in params:
        yield param
        for sub in param.when.values():
            yield from _walk(sub)


class SearchSpace:
    """The parameters to search, as paths into a LightningCLI config (see the module docstring for the YAML).

    Args:
        parameters: the top-level parameters (conditional ones hang under their categorical parameter's ``when``).
        metric: optional metric to optimise (a name the module logs), as written in the file.
        direction: optional ``"minimize"`` / ``"maximize"``, as written in the file.

    Example::

        space = SearchSpace.from_dict({"model.init_args.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}})
        config = {"model": {"class_path": "lightning_techniques.demo.DigitsCNN", "init_args": {"channels": 8}}}
        space.check(config)
        new = space.apply(config, {"model.init_args.lr": 0.01})
        assert new["model"]["init_args"] == {"channels": 8, "lr": 0.01}

    Limits: the whole space is known up front (no parameters that depend on a sampled number); categorical choices
    that are lists or mappings are stored in the study as their JSON text.
    """

    def __init__(self, parameters: Sequence[Parameter], metric: str | None = None,
                 direction: str | None = None) -> None:
        self.parameters = tuple(parameters)
        self.metric = metric
        self.direction = direction
        problems: list[str] = []
        if not self.parameters:
            problems.append("the space has no parameters")
        names: dict[str, str] = {}
        for param in _walk(self.parameters):
            if param.name in names:
                problems.append(f"parameter name {param.name!r} is used twice (paths {names[param.name]} and "
                                f"{param.path}); give each a distinct `name:`")
            names[param.name] = param.path
        _check_scope(self.parameters, set(), problems, "top level")
        if metric is not None and (not isinstance(metric, str) or not metric):
            problems.append(f"metric must be a non-empty string, got {metric!r}")
        if direction is not None and direction not in DIRECTIONS:
            problems.append(f"direction={direction!r} is not allowed; allowed: {', '.join(DIRECTIONS)}")
        if problems:
            raise SearchSpaceError(problems)
        self._by_name = {p.name: p for p in _walk(self.parameters)}

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """A space from the parsed YAML: ``{"parameters": {...}, "metric": ..., "direction": ...}`` or the
        ``parameters`` mapping alone."""
        if not isinstance(data, Mapping):
            raise SearchSpaceError([f"a search space must be a mapping of parameter paths to specs, got {data!r}"])
        if "parameters" in data:
            unknown = sorted(set(map(str, data)) - _TOP_KEYS)
            if unknown:
                raise SearchSpaceError([f"unknown top-level key(s) {', '.join(unknown)}; allowed: "
                                        f"{', '.join(sorted(_TOP_KEYS))}"])
            params_spec = data["parameters"]
            metric, direction = data.get("metric"), data.get("direction")
        else:
            params_spec, metric, direction = data, None, None
        if not isinstance(params_spec, Mapping):
            raise SearchSpaceError([f"`parameters` must be a mapping of parameter paths to specs, got {params_spec!r}"])
        problems: list[str] = []
        params = [p for p in (_parse_param(k, v, problems) for k, v in params_spec.items()) if p is not None]
        if problems:
            raise SearchSpaceError(problems)
        return cls(params, metric=metric, direction=direction)

    @classmethod
    def from_yaml(cls, source: str | Path) -> SearchSpace:
        """A space from a YAML file (a path) or YAML text (a string with a newline or a ``:``)."""
        import yaml

        text: str
        if isinstance(source, Path) or ("\n" not in source and ":" not in source):
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"search space file {str(path)!r} does not exist")
            text = path.read_text()
        else:
            text = source
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise SearchSpaceError([f"not valid YAML: {err}"]) from err
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def coerce(cls, space: SearchSpace | Mapping[str, Any] | str | Path) -> SearchSpace:
        """``space`` as a :class:`SearchSpace` (a space, a dict as in the YAML, a YAML file path or YAML text)."""
        if isinstance(space, SearchSpace):
            return space
        if isinstance(space, Mapping):
            return cls.from_dict(space)
        if isinstance(space, (str, Path)):
            return cls.from_yaml(space)
        raise TypeError(f"space must be a SearchSpace, a mapping, or a YAML path/text, got {type(space).__name__}")

    # ------------------------------------------------------------------------------------------------ reading
    def __iter__(self) -> Iterator[Parameter]:
        """Every parameter, conditional ones included (depth first)."""
        return _walk(self.parameters)

    def __len__(self) -> int:
        return len(self._by_name)

    def __getitem__(self, name: str) -> Parameter:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        """Every parameter's name (conditional ones included)."""
        return list(self._by_name)

    @property
    def is_conditional(self) -> bool:
        return any(p.when for p in self)

    def describe(self) -> list[dict[str, Any]]:
        """The space as plain data, for other search libraries (the Ray Tune driver converts it to
        ``tune.loguniform`` / ``tune.choice`` ...): one dict per top-level parameter with ``name``, ``path``,
        ``type`` and ``low``/``high``/``log``/``step`` or ``choices`` (+ ``when``: ``{choice: [dicts]}``)."""
        return [p.describe() for p in self.parameters]

    def grid(self) -> dict[str, list[Any]]:
        """``{name: values}`` for :class:`optuna.samplers.GridSampler` (choices stored as Optuna stores them)."""
        out: dict[str, list[Any]] = {}
        problems: list[str] = []
        for param in self:
            try:
                values = param.grid_values()
            except SearchSpaceError as err:
                problems.extend(err.problems)
                continue
            out[param.name] = [_choice_key(v) for v in values] if param.type == "categorical" else values
        if problems:
            raise SearchSpaceError(problems)
        return out

    # ------------------------------------------------------------------------------------------------ sampling
    def suggest(self, trial: Any) -> dict[str, Any]:
        """Sample the space through an Optuna trial (conditional parameters only in the branch taken).

        Returns ``{name: value}`` of the active parameters, with categorical choices as written in the YAML
        (lists / mappings included): the argument :meth:`apply` takes. Usable as a define-by-run function.
        """
        values: dict[str, Any] = {}
        self._suggest(trial, self.parameters, values)
        return values

    def _suggest(self, trial: Any, params: Sequence[Parameter], values: dict[str, Any]) -> None:
        for param in params:
            if param.type == "float":
                value: Any = trial.suggest_float(param.name, param.low, param.high, step=param.step, log=param.log)
            elif param.type == "int":
                value = trial.suggest_int(param.name, param.low, param.high, step=int(param.step or 1), log=param.log)
            else:
                keys = [_choice_key(c) for c in param.choices]
                key = trial.suggest_categorical(param.name, keys)
                value = param.choices[keys.index(key)]
                values[param.name] = value
                self._suggest(trial, param.branch(value), values)
                continue
            values[param.name] = value

    def from_study_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Optuna's ``trial.params`` (choices as stored) back to ``{name: value}`` as :meth:`suggest` returns it."""
        out: dict[str, Any] = {}
        for name, stored in params.items():
            param = self._by_name.get(name)
            if param is None:
                continue
            if param.type == "categorical":
                keys = [_choice_key(c) for c in param.choices]
                out[name] = param.choices[keys.index(stored)] if stored in keys else stored
            else:
                out[name] = stored
        return out

    def active(self, values: Mapping[str, Any]) -> list[Parameter]:
        """The parameters a sample sets: the top level plus the branches its categorical values select."""
        out: list[Parameter] = []

        def visit(params: Sequence[Parameter]) -> None:
            for param in params:
                out.append(param)
                if param.type == "categorical" and param.name in values:
                    visit(param.branch(values[param.name]))

        visit(self.parameters)
        return out

    # ------------------------------------------------------------------------------------------------ configs
    def check(self, config: Mapping[str, Any]) -> None:
        """Raise :class:`SearchSpaceError` naming every parameter path that does not lead to an argument of
        ``config`` (a LightningCLI config as a dict) - before any trial runs."""
        problems: list[str] = []
        for param in self:
            try:
                resolve_path(config, param.path)
            except KeyError as err:
                problems.append(f"{param.path}: {err.args[0]}")
        if problems:
            raise SearchSpaceError(problems)

    def apply(self, config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
        """A deep copy of ``config`` with the sample ``values`` (``{name: value}``, as :meth:`suggest` returns)
        written at their paths; the base config is not changed."""
        out = copy.deepcopy(dict(config))
        missing = []
        for param in self.active(values):
            if param.name not in values:
                missing.append(param.name)
                continue
            container, key = resolve_path(out, param.path, create=True)
            container[key] = copy.deepcopy(values[param.name])
        if missing:
            raise KeyError(f"the sample has no value for active parameter(s) {', '.join(missing)}")
        unknown = sorted(set(values) - set(self._by_name))
        if unknown:
            raise KeyError(f"the sample names parameter(s) the space does not have: {', '.join(unknown)}; "
                           f"the space has: {', '.join(self._by_name)}")
        return out


# ---------------------------------------------------------------------------------------------------- paths
def _import_class(class_path: str) -> type | None:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        return None
    try:
        cls = getattr(importlib.import_module(module_name), name)
        return cls if isinstance(cls, type) else None
    except (ImportError, AttributeError):
        return None


def init_arguments(cls: type) -> tuple[set[str], bool]:
    """The keyword arguments ``cls(...)`` accepts: its ``__init__``'s named parameters, followed through
    ``**kwargs`` to the base classes' ``__init__`` (as jsonargparse does). Second item: whether the chain still
    ends in ``**kwargs`` that could take anything (then unknown names cannot be ruled out)."""
    names: set[str] = set()
    open_ended = False
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        try:
            parameters = inspect.signature(klass.__init__).parameters  # type: ignore[misc]
        except (TypeError, ValueError):
            return names, True
        names |= {n for n, p in list(parameters.items())[1:]
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if not open_ended:
            break
        if klass.__module__.startswith(("lightning.", "pytorch_lightning.", "torch.")):
            # Lightning's / torch's base classes take **kwargs for framework plumbing, not for the user's values
            open_ended = False
            break
    return names, open_ended


def _short(class_path: Any) -> str:
    return str(class_path).rpartition(".")[2]


def _class_node(node: Any) -> bool:
    return isinstance(node, Mapping) and "class_path" in node


def _pick(items: list[Any], key: str, index: str | None, so_far: str) -> int:
    """Position in a list of ``class_path`` nodes picked by class name (+ index among that class) or position."""
    if key == "" and index is not None:
        try:
            position = int(index)
        except ValueError:
            position = -1
            for i, item in enumerate(items):
                if _class_node(item) and item["class_path"] == index:
                    position = i
                    break
            if position < 0:
                raise KeyError(f"{so_far} has no element of class {index!r}") from None
            return position
        if not 0 <= position < len(items):
            raise KeyError(f"{so_far}[{position}] is out of range: the list has {len(items)} element(s)")
        return position
    if key.isdigit() and index is None:
        return _pick(items, "", key, so_far)
    matches = [i for i, item in enumerate(items) if _class_node(item) and _short(item["class_path"]) == key]
    present = [_short(item["class_path"]) for item in items if _class_node(item)]
    if not matches:
        raise KeyError(f"{so_far} has no {key}; it has: {', '.join(present) or 'no class_path entries'}")
    if index is None:
        if len(matches) > 1:
            raise KeyError(f"{so_far} has {len(matches)} {key} entries: pick one with {key}[0] .. "
                           f"{key}[{len(matches) - 1}]")
        return matches[0]
    try:
        nth = int(index)
    except ValueError:
        raise KeyError(f"{key}[{index}]: the index must be an integer") from None
    if not 0 <= nth < len(matches):
        raise KeyError(f"{so_far} has {len(matches)} {key} entr{'y' if len(matches) == 1 else 'ies'}; "
                       f"{key}[{nth}] is out of range")
    return matches[nth]


def _split(path: str) -> list[str]:
    """Dot-separated segments; dots inside brackets (a whole ``class_path``) do not split."""
    return re.split(r"\.(?![^\[]*\])", path)


def _trainer_arguments() -> set[str]:
    import lightning as L

    return set(list(inspect.signature(L.Trainer.__init__).parameters)[1:])


def resolve_path(config: Any, path: str, create: bool = False) -> tuple[Any, Any]:
    """``(container, key)`` such that ``container[key]`` is the value at ``path`` in ``config`` (path syntax: the
    module docstring). With ``create``, missing ``init_args`` / argument entries are created (for :meth:`apply`).
    Raises ``KeyError`` with a message naming the step that failed and what exists there."""
    segments = _split(path)
    node: Any = config
    so_far = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        match = _SEGMENT.match(segment)
        if match is None:
            raise KeyError(f"bad path segment {segment!r}: use key, Name[i] or [i]")
        key, index = match.group("key"), match.group("index")
        here = f"{so_far}.{segment}" if so_far else segment
        if isinstance(node, list):
            position = _pick(node, key, index, so_far or "the config")
            if last:
                return node, position
            node, so_far = node[position], here
            continue
        if not isinstance(node, Mapping):
            raise KeyError(f"{so_far} is {node!r}, not a mapping or list: it has no {segment!r}")
        if index is not None:
            if key not in node or not isinstance(node[key], (list, Mapping)):
                raise KeyError(f"{here}: {so_far or 'the config'} has no list {key!r}")
            items = node[key]
            if isinstance(items, Mapping):  # a single callback written without the list
                items = [items]
                if create:
                    node[key] = items  # type: ignore[index]
            position = _pick(items, "", index, f"{so_far}.{key}" if so_far else key)
            if last:
                return items, position
            node, so_far = items[position], here
            continue
        if _class_node(node) and key == "init_args" and not last:
            so_far = here  # `model.init_args.lr`: the next segment is an argument of the class, checked below
            continue
        if _class_node(node) and key not in ("class_path", "init_args"):
            # `model.lr` means `model.init_args.lr`
            if "init_args" not in node or node["init_args"] is None:
                if not create:
                    node = {**node, "init_args": {}}
                else:
                    node["init_args"] = {}  # type: ignore[index]
            args = node["init_args"]
            if key not in args:
                cls = _import_class(str(node["class_path"]))
                if cls is None:
                    raise KeyError(f"{so_far or 'the config'}: class_path {node['class_path']!r} cannot be imported")
                accepted, open_ended = init_arguments(cls)
                if key not in accepted and not open_ended:
                    raise KeyError(f"{_short(node['class_path'])} ({node['class_path']}) takes no argument "
                                   f"{key!r}; it takes: {', '.join(sorted(accepted)) or 'none'}")
                if not last:
                    raise KeyError(f"{here}: the config does not set {key!r}, so there is nothing under it to reach")
            if last:
                return args, key
            node, so_far = args[key], here
            continue
        if key in node:
            if last:
                return node, key
            value = node[key]
            if key == "callbacks" and _class_node(value):  # a single callback written without the list
                value = [value]
                if create:
                    node[key] = value  # type: ignore[index]
            node, so_far = value, here
            continue
        # a key the config does not set: only allowed where the signature says it exists
        if so_far == "trainer" and last:
            if key in _trainer_arguments():
                return node, key
            raise KeyError(f"lightning.Trainer takes no argument {key!r}")
        if so_far == "" and key == "trainer" and not last:
            if create:
                node[key] = {}  # type: ignore[index]
                node, so_far = node[key], here
            else:
                node, so_far = {}, here
            continue
        existing = ", ".join(map(str, node)) or "nothing"
        raise KeyError(f"{so_far or 'the config'} has no {key!r}; it has: {existing}")
    return node, None  # pragma: no cover - every path has a last segment


# ---------------------------------------------------------------------------------------------------- configs
def load_config(config: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A LightningCLI config as a dict: a YAML file path, or a mapping (deep-copied)."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    if not isinstance(config, (str, Path)):
        raise TypeError(f"config must be a YAML file path or a mapping, got {type(config).__name__}")
    import yaml

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping):
        raise ValueError(f"config file {str(path)!r} must hold a mapping (trainer:, model:, data: ...), got {data!r}")
    return dict(data)


def _cli(config: Mapping[str, Any], callbacks: Sequence[Any] = ()) -> Any:
    import sys

    from lightning.pytorch.cli import LightningCLI

    from lightning_techniques.demo.cli import TechniquesCLI

    class _SearchCLI(TechniquesCLI):
        """The ``fit`` CLI's parser and objects, without its per-epoch printing (a search shows one bar)."""

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            return LightningCLI.instantiate_trainer(self, **kwargs)

    argv = sys.argv
    sys.argv = argv[:1]  # LightningCLI warns when it gets a config beside a command line
    try:
        return _SearchCLI(args=copy.deepcopy(dict(config)), run=False, save_config_callback=None,
                          trainer_defaults={"callbacks": list(callbacks)} if callbacks else None,
                          parser_kwargs={"exit_on_error": False})
    finally:
        sys.argv = argv


def build_from_config(config: Mapping[str, Any], callbacks: Sequence[Any] = (),
                      default_root_dir: str | Path | None = None) -> tuple[Any, Any, Any]:
    """``(trainer, model, datamodule)`` built from a LightningCLI config dict exactly as
    ``lightning-techniques fit --config`` builds them (same parser, ``seed_everything`` and ``torch_threads``
    applied), with ``callbacks`` (objects) added to the config's and ``default_root_dir`` set when given."""
    built = copy.deepcopy(dict(config))
    if default_root_dir is not None:
        built["trainer"] = dict(built.get("trainer") or {}, default_root_dir=str(default_root_dir))
    cli = _cli(built, callbacks)
    return cli.trainer, cli.model, cli.datamodule


def _probe_samples(space: SearchSpace) -> list[dict[str, Any]]:
    """Samples at the ends of every range and through every choice (each conditional branch taken once)."""

    def sample(params: Sequence[Parameter], end: int, forced: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for param in params:
            if param.type == "categorical":
                value = forced.get(param.name, param.choices[0 if end == 0 else -1])
                values[param.name] = value
                values.update(sample(param.branch(value), end, forced))
            else:
                values[param.name] = param.low if end == 0 else param.high
        return values

    probes = [sample(space.parameters, 0, {}), sample(space.parameters, 1, {})]
    for param in space:
        if param.type == "categorical":
            probes += [sample(space.parameters, 0, {param.name: choice}) for choice in param.choices]
    unique: list[dict[str, Any]] = []
    for probe in probes:
        if probe not in unique:
            unique.append(probe)
    return unique


def check_samples(space: SearchSpace, config: Mapping[str, Any]) -> None:
    """Check, before any trial, that the base config builds and that the config parses (LightningCLI's own
    type checks: an int argument given a float, a choice outside a ``Literal``) with every range at both ends and
    every choice taken. Raises :class:`SearchSpaceError` naming the sample and the parser's complaint."""
    space.check(config)
    try:
        cli = _cli(config)
    except Exception as err:  # noqa: BLE001 - reported with its message; the config itself is wrong
        raise SearchSpaceError([f"the base config does not build: {type(err).__name__}: {err}"]) from err
    problems: list[str] = []
    for values in _probe_samples(space):
        try:
            cli.parser.parse_object(space.apply(config, values))
        except Exception as err:  # noqa: BLE001 - jsonargparse raises ArgumentError; any failure is reported
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            problems.append(f"the config does not parse with {shown}: {err}")
    if problems:
        raise SearchSpaceError(problems)


def get_path(config: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` in ``config`` (``None`` when the config leaves it to the class's default)."""
    container, key = resolve_path(config, path)
    try:
        return container[key]
    except (KeyError, IndexError, TypeError):
        return None
