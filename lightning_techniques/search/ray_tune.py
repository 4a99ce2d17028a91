"""Ray Tune on a stock Trainer: the :class:`RayTuneReport` callback and the :func:`ray_search` driver.

:class:`RayTuneReport` reports the monitored metrics to the Ray Tune trial at the end of every validation and
saves a Lightning checkpoint into the trial's checkpoint with each report, so a trial that Ray restarts (after a
failure, or when an interrupted experiment is restored) continues from it. Compared with Ray's own
``TuneReportCheckpointCallback``: a monitored metric the module never logs is an error at the first validation
naming the logged metrics (Ray's only warns and reports nothing, which silently disables ASHA), the report carries
the global step and epoch, the checkpoint is written by every rank together (``Trainer.save_checkpoint`` is
collective under DDP) and reported by rank 0 only, and outside a Ray Tune trial the callback only records what it
would report (``reported``).

:func:`ray_search` runs a search over the same search-space YAML as
:func:`~lightning_techniques.search.optuna_search` (:mod:`lightning_techniques.search.space`) on a local Ray
cluster it starts with bounded CPUs and stops at the end, on a cluster ``ray.init`` already connected to, or on an
existing cluster's ``address``; ASHA stops unpromising trials; the best configuration is written as a ready-to-run
YAML config. Running it again with the same ``out`` and ``name`` restores the experiment (``Tuner.restore``):
finished trials are kept, unfinished and errored ones continue from their last checkpoint.

Nothing is written to the user's home directory: the experiment (trials' results and checkpoints) goes to ``out``
(Ray's default is ``~/ray_results``), the local cluster's session files to ``out/ray_tmp`` (``temp_dir``), and a
local cluster's authentication token lives in the environment of this process and its workers
(``RAY_AUTH_TOKEN``) instead of Ray's default ``~/.ray/auth_token``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.callbacks import Callback

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.distributed import agree_any, broadcast_object
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_choice
from lightning_techniques.search.space import (
    DIRECTIONS,
    Parameter,
    SearchSpace,
    build_from_config,
    check_samples,
    load_config,
)

Score = Literal["best", "last"]
SCORES: tuple[str, ...] = ("best", "last")
CHECKPOINT_FILE = "checkpoint.ckpt"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts its sockets at <temp_dir>/session_<date>_<pid>/sockets/...
_SOCKET_SUFFIX = len("/session_2026-12-01_08-00-00_000000_1234567/sockets/plasma_store")
_RESERVED = {"step", "epoch", "training_iteration", "done", "trial_id", "time_total_s", "config"}


def _in_tune_session() -> bool:
    """Whether this process runs a Ray Tune trial's function (Ray's own test, with a public fallback)."""
    try:
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session as in_session
    except ImportError:  # pragma: no cover - another Ray layout
        return False
    return bool(in_session())


class RayTuneReport(LeanHooks, Callback):
    """Reports the monitored metrics to the Ray Tune trial at every validation end, with a Lightning checkpoint
    saved into the trial's checkpoint, so ASHA (or any Tune scheduler) can stop the trial and Ray can resume it.

    Source: Liaw, Liang, Nishihara, Moritz, Gonzalez & Stoica 2018 (Tune); the ASHA scheduler it feeds is Li,
    Jamieson, Rostamizadeh, Gonen, Hardt, Recht & Talwalkar 2020 (asynchronous successive halving).

    Args:
        monitor: the logged metric(s) to report (``trainer.callback_metrics``): a name or a list of names, every one
            required - a name the module never logs is an error at the end of the first validation, naming the
            logged metrics. The report also carries ``step`` (global step) and ``epoch``.
        checkpoint: save a Lightning checkpoint (``Trainer.save_checkpoint``, file ``checkpoint.ckpt``) into the
            trial's checkpoint with each report. :func:`ray_search` resumes a restarted trial from the latest one.

    Inside a Ray Tune trial the report goes to ``ray.tune.report`` on rank 0 (every rank writes the checkpoint
    together); outside one (a plain ``fit``) nothing is sent and nothing written: ``reported`` maps each global
    step to what would have been reported, in both cases.

    Example::

        from ray import tune

        def train(config):
            trainer = L.Trainer(max_epochs=5, callbacks=[RayTuneReport(monitor="val_acc")])
            module = DigitsCNN(channels=4, lr=config["lr"])
            checkpoint = tune.get_checkpoint()  # set when Ray restarts the trial
            with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)) as folder:
                ckpt = None if folder is None else os.path.join(folder, "checkpoint.ckpt")
                trainer.fit(module, datamodule=DigitsDataModule(), ckpt_path=ckpt)

    Limits: a report is made per validation, so the scheduler's ``training_iteration`` counts validations; the
    sanity check is never reported; a step already reported (a resumed run) is not reported again.
    """

    takes_over: frozenset[str] = frozenset()  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, monitor: str | Sequence[str] = "val_loss", checkpoint: bool = True) -> None:
        names = [monitor] if isinstance(monitor, str) else monitor
        if not isinstance(names, (list, tuple)) or not names or \
                not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"monitor must be the name of a logged metric or a non-empty list of names, got "
                             f"{monitor!r}.")
        reserved = sorted(set(names) & _RESERVED)
        if reserved:
            raise ValueError(f"monitor names {reserved} clash with what Ray Tune / the report itself use "
                             f"({', '.join(sorted(_RESERVED))}); log the metric under another name.")
        if not isinstance(checkpoint, bool):
            raise TypeError(f"checkpoint must be True or False, got {checkpoint!r}.")
        self.monitor: list[str] = list(dict.fromkeys(names))
        self.checkpoint = checkpoint
        self.reported: dict[int, dict[str, float]] = {}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_conflicts(trainer, self)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        missing = [name for name in self.monitor if name not in metrics]
        if agree_any(trainer.strategy, bool(missing)):
            logged = ", ".join(sorted(metrics)) or "none"
            raise ValueError(
                f"RayTuneReport(monitor={self.monitor!r}): the run has not logged {missing or self.monitor} by the end "
                f"of validation at global step {trainer.global_step}; the logged metrics are: {logged}. Pass those "
                f"as monitor, or log the metric with self.log(...) in the module.")
        step = int(trainer.global_step)
        if step in self.reported:  # a resumed run validating again at a step it already reported
            return
        values = {name: float(metrics[name]) for name in self.monitor}
        values = broadcast_object(trainer.strategy, values)  # rank 0's values: what Tune sees
        report = {**values, "step": step, "epoch": int(trainer.current_epoch)}
        self.reported[step] = dict(values)  # before the checkpoint: a resume from it does not report this step again
        live = bool(broadcast_object(trainer.strategy, trainer.is_global_zero and _in_tune_session()))
        if not live:
            return
        if not self.checkpoint:
            if trainer.is_global_zero:
                from ray import tune

                tune.report(report)
            return
        folder: str = broadcast_object(trainer.strategy,
                                       tempfile.mkdtemp(prefix="ray-tune-report-") if trainer.is_global_zero else "")
        try:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT_FILE))  # collective: every rank calls it
            if trainer.is_global_zero:
                from ray import tune

                tune.report(report, checkpoint=tune.Checkpoint.from_directory(folder))  # copied into the trial
        finally:
            if trainer.is_global_zero:
                shutil.rmtree(folder, ignore_errors=True)

    def state_dict(self) -> dict[str, Any]:
        return {"reported": {int(step): dict(values) for step, values in self.reported.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.reported = {int(step): {k: float(v) for k, v in values.items()}
                         for step, values in state_dict.get("reported", {}).items()}


# ---------------------------------------------------------------------------------------------------- search space
def _domain(param: Parameter) -> Any:
    """The Ray Tune sampling domain of one parameter (categorical choices as their index: Ray samples any value
    type that way; :func:`_values` maps the index back)."""
    from ray import tune

    if param.type == "categorical":
        return tune.choice(list(range(len(param.choices))))
    assert param.low is not None and param.high is not None
    if param.type == "int":
        low, high = int(param.low), int(param.high)
        if param.log:
            return tune.lograndint(low, high + 1)
        step = int(param.step or 1)
        return tune.qrandint(low, high - (high - low) % step, step) if step > 1 else tune.randint(low, high + 1)
    low_f, high_f = float(param.low), float(param.high)
    if param.step is not None:
        step_f = float(param.step)
        high_f = low_f + step_f * int((high_f - low_f) / step_f + 1e-9)
        return tune.qloguniform(low_f, high_f, step_f) if param.log else tune.quniform(low_f, high_f, step_f)
    return tune.loguniform(low_f, high_f) if param.log else tune.uniform(low_f, high_f)


def param_space(space: SearchSpace) -> dict[str, Any]:
    """The search space as a Ray Tune ``param_space``: one domain per parameter name, conditional parameters
    included (every parameter is sampled; :func:`sample_values` keeps those of the branches taken)."""
    return {param.name: _domain(param) for param in space}


def sample_values(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Any]:
    """A Ray trial's ``config`` (:func:`param_space` sampled) as ``{name: value}`` of the active parameters, with
    categorical choices as written in the space - what :meth:`SearchSpace.apply` takes."""
    values: dict[str, Any] = {}

    def visit(params: Sequence[Parameter]) -> None:
        for param in params:
            raw = config[param.name]
            if param.type == "categorical":
                value = param.choices[int(raw)]
                values[param.name] = value
                visit(param.branch(value))
            elif param.type == "int":
                values[param.name] = int(raw)
            else:
                values[param.name] = float(raw)

    visit(space.parameters)
    return values


# ---------------------------------------------------------------------------------------------------- cluster
def _short_enough(folder: Path) -> bool:
    return len(str(folder.resolve())) + _SOCKET_SUFFIX <= 107


def _refresh_ray_config() -> None:
    """Ray caches its settings (the authentication mode among them) from the environment at first use; after the
    environment changed, read it again - what Ray itself does when it turns token authentication on."""
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - another Ray layout: its settings are read at ray.init
        return
    Config.initialize("")


_TOKEN: list[str] = []


def _process_token() -> str:
    """One random token per process: Ray caches the token it loaded, so a second cluster started by this process
    must get the same one."""
    if not _TOKEN:
        _TOKEN.append(secrets.token_hex(32))
    return _TOKEN[0]


@contextlib.contextmanager
def ray_cluster(address: str | None = None, num_cpus: int | None = 2, num_gpus: int | None = None,
                temp_dir: str | Path | None = None) -> Iterator[dict[str, Any]]:
    """Ray for the duration of the block: the cluster ``ray.init`` already connected to (left as it is), a
    connection to ``address`` (disconnected at the end), or a new local cluster with ``num_cpus`` / ``num_gpus``
    whose session files go to ``temp_dir`` (stopped at the end). A new local cluster gets a fresh authentication
    token through the environment (``RAY_AUTH_TOKEN``, restored at the end) unless the user configured one, so
    Ray writes no ``~/.ray/auth_token``. Yields what it did: ``{"started": bool, "address": ...}``."""
    ray = require("ray", "ray", "ray_search")
    if ray.is_initialized():
        yield {"started": False, "address": "the cluster ray.init connected to"}
        return
    # Ray's ray.init sets RAY_AUTH_MODE=token in this process's environment: restored at the end with the token
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    started = address is None
    cleanup: Path | None = None
    try:
        if started:
            user_token = any(os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
            if not user_token and not (Path.home() / ".ray" / "auth_token").is_file():
                os.environ["RAY_AUTH_TOKEN"] = _process_token()
                os.environ["RAY_AUTH_MODE"] = "token"  # said explicitly: Ray then does not warn about the mode
                _refresh_ray_config()
            folder = Path(temp_dir) if temp_dir is not None else Path(tempfile.gettempdir()) / "ray"
            if not _short_enough(folder):
                # Ray's socket paths would pass the AF_UNIX limit: a short folder in the system temp dir instead,
                # removed when the cluster stops
                folder = cleanup = Path(tempfile.mkdtemp(prefix="lt-ray-"))
            folder.mkdir(parents=True, exist_ok=True)
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _temp_dir=str(folder.resolve()),
                     logging_level="WARNING", log_to_driver=False, configure_logging=True)
        else:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        yield {"started": started, "address": address or "local", "temp_dir": None if not started else folder}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if started:
            _refresh_ray_config()
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- trials
def _fit(trainer: Any, module: Any, data: Any, ckpt_path: str | None) -> None:
    import lightning as L

    if data is None:
        trainer.fit(module, ckpt_path=ckpt_path)
    elif isinstance(data, L.LightningDataModule):
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        trainer.fit(module, train_dataloaders=data[0], val_dataloaders=data[1], ckpt_path=ckpt_path)
    else:
        raise TypeError("build(values) must return (trainer, module), (trainer, module, datamodule) or "
                        f"(trainer, module, (train_loader, val_loader)); got a third item of type {type(data).__name__}")


def _trial(config: dict[str, Any], *, space: SearchSpace, base: dict[str, Any] | None,
           build: Callable[[dict[str, Any]], Any] | None, metric: str) -> None:
    """One Ray Tune trial: build the run from the sample, resume from the trial's checkpoint if Ray restored one,
    fit with a :class:`RayTuneReport` that reports ``metric`` (the checkpoint is what the next restart resumes)."""
    import torch
    from ray import tune

    values = sample_values(space, config)
    root = Path(os.getcwd())  # Ray's per-trial working directory: synced into the experiment folder
    if base is not None:
        reporter = RayTuneReport(monitor=metric)
        trainer, module, data = build_from_config(space.apply(base, values), callbacks=[reporter],
                                                  default_root_dir=root)
    else:
        assert build is not None
        built = build(values)
        if not isinstance(built, (tuple, list)) or len(built) not in (2, 3):
            raise TypeError(f"build(values) must return (trainer, module[, datamodule]), got {type(built).__name__}")
        trainer, module = built[0], built[1]
        data = built[2] if len(built) == 3 else None
        if not any(isinstance(cb, RayTuneReport) for cb in trainer.callbacks):
            trainer.callbacks.append(RayTuneReport(monitor=metric))
    if torch.get_num_threads() > 1 and os.environ.get("OMP_NUM_THREADS") == "1":
        torch.set_num_threads(1)
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        _fit(trainer, module, data, None)
        return
    with checkpoint.as_directory() as folder:
        _fit(trainer, module, data, os.path.join(folder, CHECKPOINT_FILE))


# ---------------------------------------------------------------------------------------------------- driver
@dataclass
class RaySearchResult:
    """What :func:`ray_search` returns.

    ``results`` is Ray's ``ResultGrid`` (every trial's last result, metrics dataframe, checkpoints); ``best_params``
    the best trial's values (``{name: value}``, choices as written in the space, active parameters only);
    ``best_config`` (config mode) the base config with them written in, saved as ``best_config_path``;
    ``best_checkpoint`` the best trial's latest Lightning checkpoint file; ``stopped_early`` the trials ASHA
    stopped before their run's end; ``counts`` the trials by state."""

    results: Any
    best_params: dict[str, Any]
    best_value: float
    best_trial: str
    out: Path
    experiment: Path
    best_config: dict[str, Any] | None = None
    best_config_path: Path | None = None
    best_checkpoint: Path | None = None
    stopped_early: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    restored: bool = False


def ray_search(
    build: Callable[[dict[str, Any]], Any] | None = None,
    *,
    space: SearchSpace | Mapping[str, Any] | str | Path,
    config: str | Path | Mapping[str, Any] | None = None,
    metric: str | None = None,
    direction: Literal["minimize", "maximize"] | None = None,
    num_samples: int = 8,
    out: str | Path = "search_ray",
    name: str = "search",
    address: str | None = None,
    num_cpus: int | None = 2,
    num_gpus: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    max_concurrent_trials: int | None = None,
    grace_period: int = 1,
    reduction_factor: float = 2,
    max_t: int = 100,
    scheduler: Literal["asha", "fifo"] = "asha",
    score: Score = "best",
    max_failures: int = 1,
    keep_checkpoints: int = 2,
    time_budget_s: float | None = None,
    seed: int | None = None,
    temp_dir: str | Path | None = None,
    verbose: int = 0,
    quiet: bool = True,
) -> RaySearchResult:
    """Run (or continue) a Ray Tune search whose trials are Lightning runs; see the module docstring.

    Args:
        build: ``build(values) -> (trainer, module[, datamodule])`` given the trial's ``{name: value}``; or leave
            it out and give ``config`` (a LightningCLI config: YAML path or dict) - each trial is the config with
            its values written in, built as ``lightning-techniques fit --config`` builds it. Both modes sample
            ``space``. ``build`` is sent to Ray's worker processes, so it must be picklable.
        space: the search space (:class:`SearchSpace`, a dict as in the YAML, a YAML path or text) - the same file
            :func:`~lightning_techniques.search.optuna_search` takes.
        metric / direction: what to optimise (a name the module logs) and which way; default: the space file's.
        num_samples: trials to run (sampled at random; an experiment restored from ``out`` keeps its trials).
        out / name: the experiment goes to ``out/name`` (results, checkpoints, trials' logs); ``best_config.yaml``,
            ``best_params.yaml``, ``results.csv`` to ``out``. A second call with the same ``out`` and ``name``
            restores the experiment and continues its unfinished and errored trials from their checkpoints.
        address: an existing cluster (``"auto"``, ``"host:port"``, ``"ray://host:10001"``); None starts a local
            cluster with ``num_cpus`` / ``num_gpus`` and stops it at the end (unless ``ray.init`` was already
            called: that cluster is used and left running).
        cpus_per_trial / gpus_per_trial: each trial's resources; ``max_concurrent_trials`` caps parallel trials.
        scheduler: ``"asha"`` (asynchronous successive halving over the number of validations reported,
            ``grace_period``, ``reduction_factor``, ``max_t``) or ``"fifo"`` (no early stopping).
        score: the trial's value: the ``"best"`` of its validations (default) or the ``"last"``.
        max_failures: restarts of a failed trial, each from its latest checkpoint.
        keep_checkpoints: checkpoints kept per trial (the latest ones).
        time_budget_s: end the search after this many seconds.
        seed: seed of the random sampler (the same seed samples the same configurations).
        temp_dir: the local cluster's session folder (default ``out/ray_tmp``; a short folder in the system temp
            directory, removed at the end, when that path is too long for Ray's sockets).
        verbose: Ray Tune's progress output (0 silent, 1 status table, 2 trial results).
        quiet: hide Lightning's per-run INFO lines in the trials.

    Errors found before the cluster starts: ``build`` and ``config`` both or neither given, an unknown path, an
    empty or inverted range, a value the config's classes reject (:class:`SearchSpaceError`), a missing metric or
    direction, bad numbers. A metric the module never logs fails the first trial at its first validation.

    Example::

        result = ray_search(config="configs/search/digits.yaml", space="configs/search/digits_space.yaml",
                            num_samples=8, out="runs/ray/digits")
        print(result.best_value, result.best_config_path)
    """
    require("ray", "ray", "ray_search")
    out = Path(out)
    base: dict[str, Any] | None = None
    parsed = SearchSpace.coerce(space)
    if build is not None:
        if config is not None:
            raise ValueError("give either build (a function of the trial's values) or config, not both")
        if not callable(build):
            raise TypeError(f"build must be a function build(values) -> (trainer, module, datamodule), got "
                            f"{type(build).__name__}")
    elif config is None:
        raise ValueError("give config (a LightningCLI config to search over) or build (a function of the values)")
    else:
        base = load_config(config)
    metric = metric or parsed.metric
    chosen = direction or parsed.direction
    if not metric:
        raise ValueError("metric is required: the name of a metric the module logs (e.g. 'val_loss'), as an "
                         "argument or as `metric:` in the space file")
    if chosen is None:
        raise ValueError(f"direction is required for metric={metric!r}: 'minimize' or 'maximize' (as an argument "
                         f"or as `direction:` in the space file)")
    check_choice("direction", chosen, DIRECTIONS)
    check_choice("score", score, SCORES)
    check_choice("scheduler", scheduler, ("asha", "fifo"))
    RayTuneReport(monitor=metric)  # a reserved metric name is refused here
    for arg, value, minimum in (("num_samples", num_samples, 1), ("max_failures", max_failures, 0),
                                ("keep_checkpoints", keep_checkpoints, 1), ("grace_period", grace_period, 1),
                                ("max_t", max_t, 1), ("verbose", verbose, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    if max_t < grace_period:
        raise ValueError(f"max_t must be >= grace_period, got max_t={max_t} < grace_period={grace_period}")
    if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, (int, float)) or reduction_factor <= 1:
        raise ValueError(f"reduction_factor must be a number > 1, got {reduction_factor!r}")
    for arg, number in (("cpus_per_trial", cpus_per_trial), ("gpus_per_trial", gpus_per_trial)):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number < 0:
            raise ValueError(f"{arg} must be a number >= 0, got {number!r}")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ValueError(f"num_cpus must be a positive integer or None (all cores), got {num_cpus!r}")
    if address is None and num_cpus is not None and cpus_per_trial > num_cpus:
        raise ValueError(f"cpus_per_trial={cpus_per_trial} is more than the cluster's num_cpus={num_cpus}: no trial "
                         f"could ever start")
    if max_concurrent_trials is not None and (not isinstance(max_concurrent_trials, int) or max_concurrent_trials < 1):
        raise ValueError(f"max_concurrent_trials must be a positive integer or None, got {max_concurrent_trials!r}")
    if time_budget_s is not None and (isinstance(time_budget_s, bool) or not isinstance(time_budget_s, (int, float))
                                      or time_budget_s <= 0):
        raise ValueError(f"time_budget_s must be a positive number of seconds or None, got {time_budget_s!r}")
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty folder name, got {name!r}")
    if base is not None:
        from lightning_techniques.search.optuna_search import _quiet_lightning

        with _quiet_lightning(quiet):
            check_samples(parsed, base)  # unknown paths, inverted ranges, values the classes reject: before Ray

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    out.mkdir(parents=True, exist_ok=True)
    experiment = (out / name).resolve()
    mode = "max" if chosen == "maximize" else "min"
    trainable = tune.with_resources(
        tune.with_parameters(_quiet_trial if quiet else _trial, space=parsed, base=base, build=build, metric=metric),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    with warnings.catch_warnings(), \
            ray_cluster(address, num_cpus, num_gpus, temp_dir if temp_dir is not None else out / "ray_tmp"), \
            _environment(quiet):
        warnings.filterwarnings("ignore", module=r"ray\..*")
        restored = tune.Tuner.can_restore(str(experiment))
        if restored:
            tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
        else:
            sched = (ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                                   reduction_factor=reduction_factor)
                     if scheduler == "asha" else FIFOScheduler())
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(parsed),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples, scheduler=sched,
                                            # the cap goes to the generator: Ray ignores TuneConfig's
                                            # max_concurrent_trials beside a search_alg instance (it warns)
                                            search_alg=BasicVariantGenerator(
                                                random_state=seed, max_concurrent=max_concurrent_trials or 0),
                                            reuse_actors=True,
                                            time_budget_s=time_budget_s, trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(
                    name=name, storage_path=str(out.resolve()), verbose=verbose,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints)),
            )
        grid = tuner.fit()
    return _summarize(grid, parsed, base, metric, mode, score, out, experiment, restored)


@contextlib.contextmanager
def _environment(quiet: bool) -> Iterator[None]:
    """With ``quiet``: Ray Tune's warning that checkpoints are frequent (each validation reports one, by design)
    switched off for the search, unless the user set its threshold; the environment is restored afterwards."""
    key = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"
    set_here = quiet and key not in os.environ
    if set_here:
        os.environ[key] = "0"
    try:
        yield
    finally:
        if set_here:
            os.environ.pop(key, None)


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _quiet_trial(config: dict[str, Any], **kwargs: Any) -> None:
    from lightning_techniques.search.optuna_search import _quiet_lightning

    with _quiet_lightning(True), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trial(config, **kwargs)


def _summarize(grid: Any, space: SearchSpace, base: dict[str, Any] | None, metric: str, mode: str, score: str,
               out: Path, experiment: Path, restored: bool) -> RaySearchResult:
    import yaml

    from lightning_techniques._internal.artifacts import atomic_write_bytes

    try:
        best = grid.get_best_result(metric=metric, mode=mode, scope="all" if score == "best" else "last")
    except RuntimeError as err:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error is not None]
        raise RuntimeError(f"no trial of {experiment} reported {metric!r}; trial errors: {errors or 'none'}") from err
    frame = grid.get_dataframe()
    history = best.metrics_dataframe
    if score == "best" and history is not None and metric in history:
        value = float(history[metric].max() if mode == "max" else history[metric].min())
    else:
        value = float(best.metrics[metric])
    counts: dict[str, int] = {}
    stopped: list[str] = []
    max_iterations = int(frame["training_iteration"].max()) if "training_iteration" in frame else 0
    for result in grid:
        state = "error" if result.error is not None else "terminated"
        counts[state] = counts.get(state, 0) + 1
        iterations = int(result.metrics.get("training_iteration", 0) or 0)
        if result.error is None and iterations < max_iterations:
            stopped.append(str(result.metrics.get("trial_id")))
    best_params = sample_values(space, best.config)
    trial_id = str(best.metrics.get("trial_id"))
    checkpoint = None
    if best.checkpoint is not None:
        candidate = Path(best.checkpoint.path) / CHECKPOINT_FILE
        checkpoint = candidate if candidate.is_file() else None
    search = RaySearchResult(results=grid, best_params=best_params, best_value=value, best_trial=trial_id, out=out,
                             experiment=experiment, best_checkpoint=checkpoint, stopped_early=stopped, counts=counts,
                             restored=restored)
    atomic_write_bytes(out / "best_params.yaml", yaml.safe_dump(
        {"trial": trial_id, "value": value, "params": best_params}, sort_keys=False).encode())
    atomic_write_bytes(out / "results.csv", frame.to_csv(index=False).encode())
    if base is not None:
        search.best_config = space.apply(base, best_params)
        header = (f"# Best configuration of the Ray Tune search {experiment}: trial {trial_id}, {metric}={value:.6g}\n"
                  f"# lightning-techniques fit --config {out / 'best_config.yaml'}\n")
        search.best_config_path = atomic_write_bytes(
            out / "best_config.yaml", (header + yaml.safe_dump(search.best_config, sort_keys=False)).encode())
    return search
