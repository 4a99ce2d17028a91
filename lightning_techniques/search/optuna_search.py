"""``optuna_search``: a hyperparameter search over stock Lightning runs with Optuna, from one machine to many.

Two ways to say what a trial trains:

* a LightningCLI config plus a search space (:mod:`lightning_techniques.search.space`): each trial is the config
  with the trial's sample written in, built the way ``lightning-techniques fit --config`` builds it; or
* a function ``build(trial) -> (trainer, module, datamodule)`` that asks the trial for its values
  (``trial.suggest_float(...)``) and returns the objects to fit.

Every trial's Trainer gets an :class:`~lightning_techniques.search.OptunaPruning` callback for the search's metric
(unless ``build`` put one there itself), so the pruner stops unpromising trials; the trial's value is the best
(``score="best"``) or the last (``score="last"``) value of the metric over its validations.

Storage: an SQLite file ``<out>/study.db`` by default - nothing to start, and a search killed mid-way (even by
SIGKILL) continues the same study when run again: finished trials are kept, the ``n_trials`` target counts them,
and the interrupted trial is marked failed once its heartbeat is ``grace_period`` seconds old and run again with
the same parameters (``max_retry``). Several workers - processes on one machine, or machines - share a study by
giving the same ``storage`` and ``study_name``: an SQLite file on one machine, a journal file (a path ending in
``.journal``, :class:`optuna.storages.journal.JournalFileBackend`: safe on NFS-less local disks, no heartbeat) or
any database URL Optuna's RDB storage takes, e.g. ``postgresql+psycopg2://user:password@host:5432/db`` (install
the database's driver, e.g. ``psycopg2-binary``) for several machines.

Outputs in ``out``: ``study.db`` (the default storage), ``trials/trial_<n>/`` (each trial's run), ``best_config.yaml``
(config mode: the base config with the best trial's values, ready for ``lightning-techniques fit --config``),
``best_params.yaml``, ``trials.csv``, and the study plots (``optimization_history.png``, ``param_importances.png``,
``parallel_coordinate.png``, ``intermediate_values.png``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice
from lightning_techniques.search.pruning import OptunaPruning
from lightning_techniques.search.space import (
    DIRECTIONS,
    SearchSpace,
    build_from_config,
    check_samples,
    load_config,
)

SamplerName = Literal["tpe", "gp", "cmaes", "random", "grid"]
PrunerName = Literal["median", "successive_halving", "hyperband", "none"]
Score = Literal["best", "last"]
SAMPLERS: tuple[str, ...] = ("tpe", "gp", "cmaes", "random", "grid")
PRUNERS: tuple[str, ...] = ("median", "successive_halving", "hyperband", "none")
SCORES: tuple[str, ...] = ("best", "last")
PLOTS: tuple[str, ...] = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
_USER_ATTRS = ("metric", "direction")


@dataclass
class SearchResult:
    """What :func:`optuna_search` returns.

    ``study`` is the Optuna study (all its trials, this run's and earlier runs'); ``best_params`` the best trial's
    values (``{name: value}``, categorical choices as written in the space); ``best_config`` (config mode) the base
    config with them written in, saved as ``best_config_path``; ``plots`` maps each plot's name to its PNG file, and
    ``skipped_plots`` says why a plot could not be drawn (e.g. importances need two finished trials)."""

    study: Any
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    out: Path
    best_config: dict[str, Any] | None = None
    best_config_path: Path | None = None
    plots: dict[str, Path] = field(default_factory=dict)
    skipped_plots: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- building
def make_sampler(name: str, seed: int | None = None, space: SearchSpace | None = None) -> Any:
    """An Optuna sampler by name: ``"tpe"`` (multivariate TPE, grouped for conditional spaces), ``"gp"``
    (Gaussian-process Bayesian optimisation), ``"cmaes"``, ``"random"``, ``"grid"`` (needs ``space``)."""
    optuna = require("optuna", "hpo", "optuna_search")
    check_choice("sampler", name, SAMPLERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            conditional = space is not None and space.is_conditional
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=conditional, constant_liar=True)
        if name == "gp":
            require("scipy", "hpo", "sampler='gp' (GPSampler)")
            return optuna.samplers.GPSampler(seed=seed)
        if name == "cmaes":
            require("cmaes", "hpo", "sampler='cmaes' (CmaEsSampler)")
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    if space is None:
        raise ValueError("sampler='grid' needs a search space to take the grid from (config mode); with a build "
                         "function pass optuna.samplers.GridSampler({...}) instead.")
    return optuna.samplers.GridSampler(space.grid(), seed=seed)


def make_pruner(name: str | None) -> Any:
    """An Optuna pruner by name: ``"median"``, ``"successive_halving"``, ``"hyperband"``, ``"none"`` / None.
    Their steps are global steps (what :class:`OptunaPruning` reports)."""
    optuna = require("optuna", "hpo", "optuna_search")
    if name is None:
        return optuna.pruners.NopPruner()
    check_choice("pruner", name, PRUNERS)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_storage(storage: str | os.PathLike[str] | Any | None, out: Path, heartbeat_interval: int | None = 10,
                 grace_period: int | None = None, max_retry: int = 1) -> Any:
    """An Optuna storage: ``None`` -> SQLite file ``<out>/study.db``; a path ending in ``.journal`` -> a journal
    file; any other string -> an RDB URL (``sqlite:///...``, ``postgresql+psycopg2://...``); a storage object as
    is. RDB storages get a heartbeat (a killed run's trial is failed ``grace_period`` s after its last beat) and
    retry failed trials ``max_retry`` times. Raises ``ValueError`` naming the storage when it cannot be opened."""
    optuna = require("optuna", "hpo", "optuna_search")
    if storage is not None and not isinstance(storage, (str, os.PathLike)):
        if not isinstance(storage, optuna.storages.BaseStorage):
            raise TypeError(f"storage must be None, a URL, a .journal path or an optuna storage, got "
                            f"{type(storage).__name__}")
        return storage
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out / 'study.db').resolve()}"
    else:
        url = os.fspath(storage)
    if url.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:"))
        if not path.parent.is_dir():
            raise ValueError(f"storage {url!r} cannot be opened: the folder {str(path.parent)!r} does not exist")
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as err:  # noqa: BLE001 - any failure to open is reported with the storage named
            raise ValueError(f"storage {url!r} cannot be opened: {type(err).__name__}: {err}") from err
    if "://" not in url:
        raise ValueError(f"storage {url!r} is neither a database URL (sqlite:///file.db, "
                         f"postgresql+psycopg2://user:password@host/db, ...) nor a journal file path ending in .journal")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}  # several workers writing one file wait for the lock
    # RetryFailedTrialCallback was renamed RetryHeartbeatStaleTrialCallback in Optuna 4.9; a retried trial starts
    # its training from scratch, so it does not inherit the dead trial's intermediate values
    retry_class = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = retry_class(max_retry=max_retry) if max_retry > 0 and heartbeat_interval else None
            for attempt in range(6):
                try:
                    return optuna.storages.RDBStorage(
                        url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period if heartbeat_interval else None,
                        heartbeat_stale_trial_callback=retry,
                    )
                except Exception as err:  # noqa: BLE001 - only the table-creation race is retried
                    # two workers starting on a new database both create Optuna's tables: the loser's INSERT of the
                    # schema version fails (UNIQUE constraint / duplicate key); the tables exist now, so open again
                    text = str(err).lower()
                    if attempt == 5 or not ("unique" in text or "duplicate" in text or "already exists" in text):
                        raise
                    time.sleep(0.2 * (attempt + 1))
    except Exception as err:  # noqa: BLE001 - sqlalchemy/driver errors of every kind: name the storage
        shown = _hide_password(url)
        raise ValueError(f"storage {shown!r} cannot be opened: {type(err).__name__}: {str(err).splitlines()[0]}") \
            from err


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in credentials else ''}@{host}"


@contextlib.contextmanager
def _quiet_lightning(enabled: bool) -> Iterator[None]:
    """Lightning's per-run INFO lines (GPU available ..., `Trainer.fit` stopped ...) hidden during the search."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning_techniques")
    levels = {name: logging.getLogger(name).level for name in names}
    if enabled:
        for name in names:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


# ---------------------------------------------------------------------------------------------------- running
def _pruning_callback(trainer: Any, trial: Any, metric: str) -> OptunaPruning:
    for callback in trainer.callbacks:
        if isinstance(callback, OptunaPruning):
            if callback.trial is not trial:
                raise ValueError("the Trainer build(trial) returned has an OptunaPruning callback for another "
                                 "trial: pass it this trial, or leave it out and the search adds one")
            return callback
    callback = OptunaPruning(trial, monitor=metric)
    trainer.callbacks.append(callback)
    return callback


def _trial_value(trainer: Any, pruning: OptunaPruning, metric: str, direction: str, score: str) -> float:
    pruning.check_pruned()  # raises optuna.TrialPruned: the study records the trial as pruned
    values = [pruning.reported[step] for step in sorted(pruning.reported)]
    if not values:
        logged = trainer.callback_metrics
        if metric not in logged:
            raise ValueError(f"the trial's run never validated and never logged {metric!r}; logged metrics: "
                             f"{', '.join(sorted(logged)) or 'none'} (does the Trainer validate? "
                             f"limit_val_batches / check_val_every_n_epoch)")
        return float(logged[metric])
    if score == "last":
        return values[-1]
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return math.nan
    return min(finite) if direction == "minimize" else max(finite)


def _fit(trainer: Any, module: Any, data: Any) -> None:
    import lightning as L

    if data is None:
        trainer.fit(module)
    elif isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        trainer.fit(module, train_dataloaders=data[0], val_dataloaders=data[1])
    else:
        raise TypeError("build(trial) must return (trainer, module), (trainer, module, datamodule) or "
                        "(trainer, module, (train_loader, val_loader)); got a third item of type "
                        f"{type(data).__name__}")


def _trial_objects(trial: Any, pruning_trial: Any, build: Callable[[Any], Any] | None, space: SearchSpace | None,
                   base: Mapping[str, Any] | None, metric: str, out: Path) -> tuple[Any, Any, Any, OptunaPruning]:
    """The trial's (trainer, module, data, pruning callback): from the config + space, or from ``build``."""
    if base is not None and space is not None:
        values = space.suggest(trial)
        pruning = OptunaPruning(pruning_trial, monitor=metric)
        trainer, module, data = build_from_config(space.apply(base, values), callbacks=[pruning],
                                                  default_root_dir=out / "trials" / f"trial_{trial.number}")
        return trainer, module, data, pruning
    assert build is not None
    built = build(trial)
    if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
        raise TypeError("build(trial) must return (trainer, module) or (trainer, module, datamodule), got "
                        f"{type(built).__name__}")
    trainer, module = built[0], built[1]
    data = built[2] if len(built) == 3 else None
    return trainer, module, data, _pruning_callback(trainer, trial, metric)


# A trial whose Trainer runs several processes (strategy="ddp", devices=2): Lightning's launcher starts the other
# ranks at the first fit by running the same command again, with the environment of rank 0. Rank 0 puts the first
# trial's parameters into the environment; later trials' parameters go over the process group, which Lightning keeps
# between Trainers. The other ranks replay each trial with an optuna FixedTrial (the same build, the same values),
# their OptunaPruning follows rank 0's decisions, and a final message (None) ends them.
_DDP_TRIAL_ENV = "LIGHTNING_TECHNIQUES_SEARCH_TRIAL"


class _DDPLeader:
    """Rank 0's side of the protocol above."""

    def __init__(self) -> None:
        self.waiting = False  # the other ranks finished a trial and wait for the next message

    def before_fit(self, trainer: Any, trial: Any) -> None:
        if getattr(trainer, "world_size", 1) <= 1:
            return
        message = json.dumps({"number": trial.number, "params": dict(trial.params)})
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.broadcast_object_list([message], src=0)
            self.waiting = False
        else:
            os.environ[_DDP_TRIAL_ENV] = message  # the launcher copies it into the other ranks' environment

    def after_fit(self, trainer: Any) -> None:
        self.waiting = getattr(trainer, "world_size", 1) > 1

    def release(self) -> None:
        if not self.waiting:
            return
        import torch.distributed as dist

        dist.broadcast_object_list([None], src=0)
        self.waiting = False


def _follow(message: dict[str, Any], build: Callable[[Any], Any] | None, space: SearchSpace | None,
            base: Mapping[str, Any] | None, metric: str, out: Path) -> None:
    """The other ranks' side: train each trial rank 0 announces until it says stop."""
    import optuna
    import torch.distributed as dist

    current: dict[str, Any] | None = message
    while current is not None:
        trial = optuna.trial.FixedTrial(current["params"], number=current["number"])
        trainer, module, data, _ = _trial_objects(trial, None, build, space, base, metric, out)
        _fit(trainer, module, data)
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0)
        current = None if received[0] is None else json.loads(received[0])


def optuna_search(
    build: Callable[[Any], Any] | None = None,
    *,
    config: str | Path | Mapping[str, Any] | None = None,
    space: SearchSpace | Mapping[str, Any] | str | Path | None = None,
    metric: str | None = None,
    direction: Literal["minimize", "maximize"] | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    sampler: SamplerName | Any = "tpe",
    pruner: PrunerName | Any | None = "median",
    storage: str | Path | Any | None = None,
    study_name: str = "search",
    out: str | Path = "search",
    seed: int | None = None,
    score: Score = "best",
    max_retry: int = 1,
    heartbeat_interval: int | None = 10,
    grace_period: int | None = None,
    show_progress_bar: bool = True,
    plots: bool = True,
    quiet: bool = True,
) -> SearchResult | None:
    """Run (or continue) an Optuna study whose trials are Lightning runs; see the module docstring.

    Args:
        build: ``build(trial) -> (trainer, module[, datamodule])``; or leave it out and give ``config`` + ``space``.
        config: a LightningCLI config (YAML path or dict) - the base every trial changes.
        space: the search space (:class:`SearchSpace`, a dict as in the YAML, a YAML path or text).
        metric / direction: what to optimise (a name the module logs) and which way; default: the space file's.
        n_trials: the number of finished (complete or pruned) trials the study should have: a rerun after an
            interruption runs only the missing ones, and several workers stop together. ``timeout``: seconds for
            this call. At least one of them (a grid search also ends when the grid is done).
        sampler: ``"tpe"`` (default), ``"gp"``, ``"cmaes"``, ``"random"``, ``"grid"``, or an Optuna sampler.
        pruner: ``"median"`` (default), ``"successive_halving"``, ``"hyperband"``, ``"none"``/None, or a pruner.
        storage: None (SQLite ``<out>/study.db``), a database URL, a ``.journal`` path, or an Optuna storage.
        study_name: the study's name in the storage (a rerun or a second worker with the same name joins it).
        out: the folder for trials' runs, the best config, the plots (and the default storage).
        seed: the sampler's seed.
        score: a trial's value: the ``"best"`` of its validations (default) or the ``"last"``.
        max_retry / heartbeat_interval / grace_period: RDB storages: a trial whose process died is failed once its
            heartbeat (every ``heartbeat_interval`` s) is ``grace_period`` s old (default twice the interval) and
            run again with the same values up to ``max_retry`` times.
        show_progress_bar: Optuna's progress bar over the trials. ``plots``: write the study's plots.
        quiet: hide Lightning's per-run INFO lines during the search.

    DDP: a trial's Trainer may run several processes on one machine (``strategy="ddp"``, ``devices=2``, Lightning's
    own launcher): rank 0 runs the search and tells the other ranks each trial's values, their ``OptunaPruning``
    follows rank 0's decision, and ``optuna_search`` returns ``None`` on those ranks. Several *trials* in parallel:
    start more workers on the same storage instead.

    Errors found before the first trial: ``build`` and ``config``/``space`` both or neither given; an unknown path,
    an empty or inverted range, a value the config's classes reject (:class:`SearchSpaceError`); a missing metric or
    direction; an unknown sampler or pruner; a storage that cannot be opened; a study in the storage with another
    direction or metric. A metric the module never logs stops the first trial at its first validation.

    Example::

        result = optuna_search(config="configs/search/digits.yaml", space="configs/search/digits_space.yaml",
                               n_trials=20, out="runs/search/digits")
        print(result.best_value, result.best_config_path)
    """
    optuna = require("optuna", "hpo", "optuna_search")
    out = Path(out)
    # ----------------------------------------------------------------------------------------- checks
    base: dict[str, Any] | None = None
    parsed: SearchSpace | None = None
    if build is not None:
        if config is not None or space is not None:
            raise ValueError("give either build (a function of the trial) or config + space, not both")
        if not callable(build):
            raise TypeError(f"build must be a function build(trial) -> (trainer, module, datamodule), got "
                            f"{type(build).__name__}")
    else:
        if config is None or space is None:
            missing = "config" if config is None else "space"
            raise ValueError(f"config mode needs both config and space ({missing} is missing); or give build")
        parsed = SearchSpace.coerce(space)
        base = load_config(config)
    metric = metric or (parsed.metric if parsed is not None else None)
    chosen: str | None = direction or (parsed.direction if parsed is not None else None)
    if not metric:
        raise ValueError("metric is required: the name of a metric the module logs (e.g. 'val_loss'), as an "
                         "argument or as `metric:` in the space file")
    if chosen is None:
        raise ValueError(f"direction is required for metric={metric!r}: 'minimize' or 'maximize' (as an argument "
                         f"or as `direction:` in the space file)")
    check_choice("direction", chosen, DIRECTIONS)
    goal: str = chosen
    check_choice("score", score, SCORES)
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise ValueError(f"n_trials must be a positive integer or None, got {n_trials!r}")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if not isinstance(max_retry, int) or max_retry < 0:
        raise ValueError(f"max_retry must be an integer >= 0, got {max_retry!r}")
    if heartbeat_interval is not None and (not isinstance(heartbeat_interval, int) or heartbeat_interval < 1):
        raise ValueError(f"heartbeat_interval must be a positive integer (seconds) or None, got {heartbeat_interval!r}")
    if not isinstance(study_name, str) or not study_name:
        raise ValueError(f"study_name must be a non-empty string, got {study_name!r}")
    sampler_obj = make_sampler(sampler, seed, parsed) if isinstance(sampler, str) else sampler
    if not isinstance(sampler_obj, optuna.samplers.BaseSampler):
        raise TypeError(f"sampler must be one of {', '.join(SAMPLERS)} or an optuna sampler, got {sampler!r}")
    if n_trials is None and timeout is None and not isinstance(sampler_obj, optuna.samplers.GridSampler):
        raise ValueError("give n_trials or timeout (or both): the search needs an end")
    pruner_obj = make_pruner(pruner) if pruner is None or isinstance(pruner, str) else pruner
    if not isinstance(pruner_obj, optuna.pruners.BasePruner):
        raise TypeError(f"pruner must be one of {', '.join(PRUNERS)}, None or an optuna pruner, got {pruner!r}")
    if base is not None and parsed is not None:
        with _quiet_lightning(quiet):
            check_samples(parsed, base)  # unknown paths, values the config's classes reject: before any trial
    first = os.environ.get(_DDP_TRIAL_ENV)
    if first is not None and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        # a DDP rank Lightning launched for one of rank 0's trials: train what rank 0 says, touch no storage
        with _quiet_lightning(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            _follow(json.loads(first), build, parsed, base, metric, out)
        return None
    if int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("RANK", "0")) > 0:
        raise RuntimeError(
            "optuna_search was started on a rank other than 0 by an external launcher (torchrun, SLURM, ...): a "
            "search runs in one process, and Lightning's own DDP launcher starts the other ranks of each trial. "
            "Start the search as a plain process (strategy='ddp' in the trial's Trainer is fine).")
    storage_obj = open_storage(storage, out, heartbeat_interval, grace_period, max_retry)
    study = optuna.create_study(storage=storage_obj, sampler=sampler_obj, pruner=pruner_obj, study_name=study_name,
                                direction=goal, load_if_exists=True)
    if study.direction.name.lower() != goal:
        raise ValueError(f"the study {study_name!r} in this storage optimises {study.direction.name.lower()}, not "
                         f"direction={goal!r}: use another study_name or storage")
    known = study.user_attrs.get("metric")
    if known is not None and known != metric:
        raise ValueError(f"the study {study_name!r} in this storage optimises {known!r}, not metric={metric!r}: use "
                         f"another study_name or storage")
    if known is None:
        study.set_user_attr("metric", metric)

    # ----------------------------------------------------------------------------------------- trials
    ddp = _DDPLeader()

    def objective(trial: Any) -> float:
        trainer, module, data, pruning = _trial_objects(trial, trial, build, parsed, base, metric, out)
        ddp.before_fit(trainer, trial)
        _fit(trainer, module, data)
        ddp.after_fit(trainer)
        return _trial_value(trainer, pruning, metric, goal, score)

    finished_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished_states))
    remaining = None if n_trials is None else max(0, n_trials - done)
    callbacks = [] if n_trials is None else [optuna.study.MaxTrialsCallback(n_trials, states=finished_states)]
    if remaining != 0:
        with _quiet_lightning(quiet), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                study.optimize(objective, n_trials=remaining, timeout=timeout, callbacks=callbacks,
                               show_progress_bar=show_progress_bar)
            finally:
                ddp.release()
    return summarize(study, out, space=parsed, config=base, plots=plots)


# ---------------------------------------------------------------------------------------------------- results
def summarize(study: Any, out: str | Path, space: SearchSpace | None = None, config: Mapping[str, Any] | None = None,
              plots: bool = True) -> SearchResult:
    """The :class:`SearchResult` of a study, with ``best_params.yaml``, ``trials.csv``, the best config (given the
    space and base config) and the plots written to ``out``."""
    import yaml

    from lightning_techniques._internal.artifacts import atomic_write_bytes

    optuna = require("optuna", "hpo", "optuna_search")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    states = optuna.trial.TrialState
    counts = {state.name.lower(): len(study.get_trials(deepcopy=False, states=(state,))) for state in states}
    complete = study.get_trials(deepcopy=False, states=(states.COMPLETE,))
    if not complete:
        raise RuntimeError(f"the study {study.study_name!r} has no complete trial yet ({counts}); nothing to report")
    best = study.best_trial
    best_params = space.from_study_params(best.params) if space is not None else dict(best.params)
    result = SearchResult(study=study, best_params=best_params, best_value=float(best.value), best_trial=best.number,
                          out=out, counts=counts)
    atomic_write_bytes(out / "best_params.yaml", yaml.safe_dump(
        {"trial": best.number, "value": float(best.value), "params": best_params}, sort_keys=False).encode())
    if space is not None and config is not None:
        result.best_config = space.apply(config, best_params)
        header = (f"# Best configuration of study {study.study_name!r}: trial {best.number}, "
                  f"{study.user_attrs.get('metric', 'value')}={best.value:.6g}\n"
                  f"# lightning-techniques fit --config {out / 'best_config.yaml'}\n")
        result.best_config_path = atomic_write_bytes(
            out / "best_config.yaml", (header + yaml.safe_dump(result.best_config, sort_keys=False)).encode())
    with contextlib.suppress(ImportError):
        frame = study.trials_dataframe()
        atomic_write_bytes(out / "trials.csv", frame.to_csv(index=False).encode())
    if plots:
        result.plots, result.skipped_plots = write_plots(study, out)
    return result


def write_plots(study: Any, out: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Optuna's standard plots of ``study`` as PNG files in ``out`` (:mod:`optuna.visualization.matplotlib`):
    optimisation history, parameter importances, parallel coordinates, intermediate values. Returns the files
    written and, for each plot that could not be drawn, why."""
    import io

    optuna = require("optuna", "hpo", "the study plots")
    require("matplotlib", "hpo", "the study plots")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from lightning_techniques._internal.artifacts import atomic_write_bytes

    out = Path(out)
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    with_values = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    reasons: dict[str, str] = {}
    if len(complete) < 2:
        reasons["param_importances"] = f"needs at least 2 complete trials, the study has {len(complete)}"
    if not any(t.params for t in complete):
        reasons["param_importances"] = reasons["parallel_coordinate"] = "the complete trials have no parameters"
    if not with_values:
        reasons["intermediate_values"] = "no trial reported intermediate values"
    makers: dict[str, Callable[[Any], Any]] = {
        "optimization_history": ovm.plot_optimization_history,
        "param_importances": ovm.plot_param_importances,
        "parallel_coordinate": ovm.plot_parallel_coordinate,
        "intermediate_values": ovm.plot_intermediate_values,
    }
    written: dict[str, Path] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, make in makers.items():
            if name in reasons:
                continue
            try:
                axes = make(study)
            except Exception as err:  # noqa: BLE001 - a plot that cannot be drawn is reported, not fatal
                reasons[name] = f"{type(err).__name__}: {err}"
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            buffer = io.BytesIO()
            figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
            plt.close(figure)
            written[name] = atomic_write_bytes(out / f"{name}.png", buffer.getvalue())
    return written, reasons


# ---------------------------------------------------------------------------------------------------- command line
def search_main(argv: list[str] | None = None) -> SearchResult | None:
    """``lightning-techniques search --config CONFIG --space SPACE [options]``: :func:`optuna_search` in config
    mode, then a summary (best value and values, the ready-to-run best config, the plots, how to continue)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="lightning-techniques search",
        description="Optuna hyperparameter search over a LightningCLI config (the same config `fit` takes) and a "
                    "search space in YAML. Run it again with the same --out (or --storage/--study-name) to continue "
                    "the study; run it in several processes to share it.")
    parser.add_argument("--config", required=True, help="the LightningCLI config every trial starts from")
    parser.add_argument("--space", required=True, help="the search space YAML (paths into the config)")
    parser.add_argument("--n-trials", type=int, default=None,
                        help="finished trials the study should have (a rerun runs the missing ones)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds for this run")
    parser.add_argument("--metric", default=None, help="the logged metric to optimise (default: the space file's)")
    parser.add_argument("--direction", choices=DIRECTIONS, default=None, help="default: the space file's")
    parser.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    parser.add_argument("--pruner", choices=PRUNERS, default="median")
    parser.add_argument("--storage", default=None,
                        help="database URL (sqlite:///f.db, postgresql+psycopg2://...) or a .journal file; "
                             "default: sqlite <out>/study.db")
    parser.add_argument("--study-name", default="search")
    parser.add_argument("--out", default="runs/search", help="folder for the trials, best config and plots")
    parser.add_argument("--seed", type=int, default=None, help="the sampler's seed")
    parser.add_argument("--score", choices=SCORES, default="best",
                        help="a trial's value: the best of its validations or the last")
    parser.add_argument("--max-retry", type=int, default=1, help="runs again of a trial whose process died")
    parser.add_argument("--no-plots", action="store_true", help="do not write the study plots")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # a command-line run draws its plots to files only
    try:
        result = optuna_search(config=args.config, space=args.space, metric=args.metric, direction=args.direction,
                               n_trials=args.n_trials, timeout=args.timeout, sampler=args.sampler,
                               pruner=args.pruner, storage=args.storage, study_name=args.study_name, out=args.out,
                               seed=args.seed, score=args.score, max_retry=args.max_retry,
                               plots=not args.no_plots, show_progress_bar=not args.no_progress_bar)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        parser.exit(2, f"lightning-techniques search: error: {err}\n")
    if result is None:  # a DDP rank other than 0: rank 0 reports
        return None
    study = result.study
    counts = ", ".join(f"{n} {state}" for state, n in result.counts.items() if n)
    print()
    print(f"Study {study.study_name!r}: {counts}")
    print(f"Best trial {result.best_trial}: {study.user_attrs.get('metric', 'value')} = {result.best_value:.6g}")
    for name, value in result.best_params.items():
        print(f"  {name}: {value!r}")
    if result.best_config_path is not None:
        print(f"Best config (ready to run): lightning-techniques fit --config {result.best_config_path}")
    for name, path in result.plots.items():
        print(f"Plot {name}: {path}")
    for name, why in result.skipped_plots.items():
        print(f"Plot {name} not drawn: {why}")
    if result.counts.get("running"):
        print(f"{result.counts['running']} trial(s) still marked running: another worker's, or a killed run's (failed "
              f"and retried once its heartbeat is older than the grace period, when the study runs again)")
    print(f"Trials: {result.out / 'trials'}   Continue or add a worker: the same command again")
    sys.stdout.flush()
    return result
