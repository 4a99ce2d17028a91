"""optuna_search and `lightning-techniques search`: real (tiny) searches, samplers, pruners, storage, bad input,
resume after SIGKILL, two workers on one study, a real PostgreSQL server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning as L
import optuna
import pytest
import yaml

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.search import OptunaPruning, SearchResult, SearchSpaceError, optuna_search
from lightning_techniques.search.optuna_search import make_pruner, make_sampler
from lightning_techniques.search.space import SearchSpace, build_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
optuna.logging.set_verbosity(optuna.logging.WARNING)
TrialState = optuna.trial.TrialState

SPACE = {
    "metric": "val_loss",
    "direction": "minimize",
    "parameters": {
        "trainer.callbacks.OptimizerCallback.lr": {"type": "float", "low": 1.0e-3, "high": 0.03, "log": True},
        "trainer.callbacks.LRSchedule.warmup_fraction": {"type": "float", "low": 0.0, "high": 0.3},
    },
}


@pytest.fixture
def config() -> dict:
    """configs/search/digits.yaml made tiny: 4 channels, 1 epoch of 4 batches, validation every 2 steps."""
    base = load_config(ROOT / "configs/search/digits.yaml")
    base["model"]["init_args"]["channels"] = 4
    base["trainer"].update(max_epochs=1, limit_train_batches=4, val_check_interval=2, limit_val_batches=1,
                           logger=False, enable_checkpointing=False)
    return base


def _quiet_kwargs(**kwargs: Any) -> dict:
    return dict(show_progress_bar=False, **kwargs)


def _tiny_trainer(trial: Any = None, **kwargs: Any) -> L.Trainer:
    settings: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                    max_epochs=1, limit_train_batches=4, val_check_interval=2, limit_val_batches=1)
    settings.update(kwargs)
    return L.Trainer(**settings)


# ---------------------------------------------------------------------------------------------------- real searches
def test_cli_search_end_to_end(config: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`lightning-techniques search`: a real search over a config and a YAML space; the best config is written,
    ready to run, and holds the best trial's values; the four plots are PNG files; a rerun continues the study."""
    from lightning_techniques.demo.cli import main

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "out"
    args = ["search", "--config", str(tmp_path / "base.yaml"), "--space", str(tmp_path / "space.yaml"),
            "--n-trials", "3", "--sampler", "random", "--seed", "1", "--out", str(out), "--no-progress-bar"]
    main(args)
    printed = capsys.readouterr().out
    assert "Study 'search': 3 complete" in printed
    assert f"lightning-techniques fit --config {out / 'best_config.yaml'}" in printed
    best_params = yaml.safe_load((out / "best_params.yaml").read_text())
    best_config = yaml.safe_load((out / "best_config.yaml").read_text())
    lr = best_params["params"]["trainer.callbacks.OptimizerCallback.lr"]
    assert best_config["trainer"]["callbacks"][0]["init_args"]["lr"] == lr
    assert best_config["trainer"]["callbacks"][1]["init_args"]["warmup_fraction"] == \
        best_params["params"]["trainer.callbacks.LRSchedule.warmup_fraction"]
    trainer, model, _ = build_from_config(best_config, default_root_dir=tmp_path / "check")  # ready to run
    assert next(cb for cb in trainer.callbacks if type(cb).__name__ == "OptimizerCallback").lr == lr
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "trials.csv").read_text().count("\n") == 4
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    values = {t.number: t.value for t in study.trials}
    assert best_params["value"] == min(values.values())
    # every trial reported each validation (2 per trial, by global step)
    assert all(sorted(t.intermediate_values) == [2, 4] for t in study.trials)
    # run again with a larger target: the study continues, the finished trials are kept
    main([*args[:5], "--n-trials", "4", *args[7:]])
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 4 and {t.number: t.value for t in study.trials[:3]} == values


def test_a_time_budget_ends_the_search(config: dict, tmp_path: Path) -> None:
    start = time.monotonic()
    result = optuna_search(config=config, space=SPACE, timeout=1.0, sampler="random", pruner="none",
                           out=tmp_path / "out", plots=False, show_progress_bar=False)
    assert isinstance(result, SearchResult) and result.counts["complete"] >= 1
    assert time.monotonic() - start < 30  # stops after the trial running when the budget is spent


def test_cli_reports_bad_input_as_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from lightning_techniques.demo.cli import main

    (tmp_path / "space.yaml").write_text("model.init_args.lr: {type: float, low: 0.1, high: 0.01}\n")
    with pytest.raises(SystemExit) as info:
        main(["search", "--config", str(ROOT / "configs/search/digits.yaml"), "--space", str(tmp_path / "space.yaml"),
              "--metric", "val_acc", "--direction", "maximize", "--n-trials", "2", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "lightning-techniques search: error: invalid search space" in capsys.readouterr().err
    assert _no_trial_ran(tmp_path / "out")


def test_build_function_mode_adds_pruning_and_scores_the_best_validation(tmp_path: Path) -> None:
    seen: list[Any] = []

    def build(trial: optuna.Trial) -> tuple:
        lr = trial.suggest_float("lr", 1e-3, 3e-2, log=True)
        trainer = _tiny_trainer(default_root_dir=str(tmp_path))
        seen.append(trainer)
        return trainer, DigitsCNN(channels=4, lr=lr), DigitsDataModule(batch_size=32)

    result = optuna_search(build, metric="val_acc", direction="maximize", n_trials=2, pruner="none",
                           out=tmp_path / "out", plots=False, **_quiet_kwargs())
    assert result.best_config is None and result.best_config_path is None
    assert set(result.best_params) == {"lr"}
    for trainer, trial in zip(seen, result.study.trials, strict=True):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, OptunaPruning))
        assert pruning.trial.number == trial.number
        assert trial.value == max(pruning.reported.values())  # score="best"
    assert result.best_value == max(t.value for t in result.study.trials)


def test_median_pruner_prunes_inside_the_search(tmp_path: Path) -> None:
    """A useful LR, then a useless one: the second trial is pruned at its first validation."""
    def build(trial: optuna.Trial) -> tuple:
        lr = [0.01, 1e-7][trial.number]
        trial.set_user_attr("lr", lr)
        L.seed_everything(0, verbose=False)
        return _tiny_trainer(default_root_dir=str(tmp_path)), DigitsCNN(channels=4, lr=lr), DigitsDataModule()

    result = optuna_search(build, metric="val_loss", direction="minimize", n_trials=2,
                           pruner=optuna.pruners.MedianPruner(n_startup_trials=1), storage=None,
                           out=tmp_path / "out", plots=False, **_quiet_kwargs())
    states = {t.user_attrs["lr"]: t.state for t in result.study.trials}
    assert states == {0.01: TrialState.COMPLETE, 1e-7: TrialState.PRUNED}
    assert result.counts["pruned"] == 1
    pruned = next(t for t in result.study.trials if t.state == TrialState.PRUNED)
    assert sorted(pruned.intermediate_values) == [2]  # stopped at its first validation


def test_grid_search_over_the_space_ends_when_the_grid_is_done(config: dict, tmp_path: Path) -> None:
    space = {"trainer.callbacks.OptimizerCallback.name": {"choices": ["adamw", "sgd"]},
             "trainer.callbacks.LRSchedule.warmup_fraction": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.2}}
    result = optuna_search(config=config, space=space, metric="val_loss", direction="minimize", sampler="grid",
                           pruner="none", out=tmp_path / "out", plots=False, **_quiet_kwargs())
    combos = {(t.params["trainer.callbacks.OptimizerCallback.name"],
               t.params["trainer.callbacks.LRSchedule.warmup_fraction"]) for t in result.study.trials}
    assert combos == {("adamw", 0.0), ("adamw", 0.2), ("sgd", 0.0), ("sgd", 0.2)}
    assert result.best_config is not None


@pytest.mark.parametrize("name", ["tpe", "gp", "cmaes", "random", "grid"])
def test_every_sampler_searches(name: str) -> None:
    """Each named sampler drives a real (pure Optuna) study over a space with a float, an int and a choice."""
    space = SearchSpace.from_dict({"x": {"type": "float", "low": -2.0, "high": 2.0, "step": 0.5},
                                   "n": {"type": "int", "low": 1, "high": 3},
                                   "c": {"choices": ["a", "b"]}})
    sampler = make_sampler(name, seed=0, space=space)
    expected = {"tpe": "TPESampler", "gp": "GPSampler", "cmaes": "CmaEsSampler", "random": "RandomSampler",
                "grid": "GridSampler"}[name]
    assert type(sampler).__name__ == expected
    study = optuna.create_study(sampler=sampler)

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        return values["x"] ** 2 + values["n"] + float(values["c"] == "b")

    study.optimize(objective, n_trials=12)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 12
    assert all(t.params["x"] in {-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0} for t in study.trials)
    assert study.best_value == min(t.value for t in study.trials)


def test_named_pruners() -> None:
    assert type(make_pruner("median")).__name__ == "MedianPruner"
    assert type(make_pruner("successive_halving")).__name__ == "SuccessiveHalvingPruner"
    assert type(make_pruner("hyperband")).__name__ == "HyperbandPruner"
    assert type(make_pruner("none")).__name__ == type(make_pruner(None)).__name__ == "NopPruner"


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
def test_resource_pruners_run_a_search(pruner: str, config: dict, tmp_path: Path) -> None:
    result = optuna_search(config=config, space=SPACE, n_trials=3, pruner=pruner, sampler="random", seed=0,
                           out=tmp_path / "out", plots=False, **_quiet_kwargs())
    assert result.counts["complete"] + result.counts["pruned"] == 3
    assert result.counts["complete"] >= 1


# ---------------------------------------------------------------------------------------------------- bad input
def _no_trial_ran(out: Path) -> bool:
    return not (out / "trials").exists()


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"space": {"model.init_args.lrr": {"type": "float", "low": 0.01, "high": 0.1}}}, SearchSpaceError,
     "DigitsCNN (lightning_techniques.demo.DigitsCNN) takes no argument 'lrr'"),
    ({"space": {"trainer.callbacks.LRSchedule.warmup_fraction": {"type": "float", "low": 0.3, "high": 0.1}}},
     SearchSpaceError, "inverted range: low=0.3 > high=0.1"),
    ({"space": {"model.init_args.channels": {"type": "int", "low": 8, "high": 8}}}, SearchSpaceError,
     "empty range: low == high == 8"),
    ({"space": {"trainer.callbacks.EarlyStopping.patience": {"type": "int", "low": 1, "high": 3}}},
     SearchSpaceError, "trainer.callbacks has no EarlyStopping; it has: OptimizerCallback, LRSchedule, LSUVInit"),
    ({"storage": "sqlite:////nonexistent-folder/x/study.db"}, ValueError,
     "storage 'sqlite:////nonexistent-folder/x/study.db' cannot be opened"),
    ({"storage": "postgresql+psycopg2://user:secret@127.0.0.1:1/db"}, ValueError,
     "storage 'postgresql+psycopg2://user:***@127.0.0.1:1/db' cannot be opened: OperationalError"),
    ({"storage": "study.db"}, ValueError, "is neither a database URL"),
    ({"storage": "/nonexistent-folder/s.journal"}, ValueError, "the folder '/nonexistent-folder' does not exist"),
    ({"metric": None, "space": {"model.lr": {"type": "float", "low": 0.001, "high": 0.1}}}, ValueError,
     "metric is required"),
    ({"direction": None, "space": {"model.lr": {"type": "float", "low": 0.001, "high": 0.1}}}, ValueError,
     "direction is required for metric='val_loss'"),
    ({"direction": "max"}, ValueError, "direction='max' is not allowed"),
    ({"n_trials": None}, ValueError, "give n_trials or timeout"),
    ({"n_trials": 0}, ValueError, "n_trials must be a positive integer"),
    ({"timeout": -1}, ValueError, "timeout must be a positive number"),
    ({"sampler": "bayes"}, ValueError, "sampler='bayes' is not allowed"),
    ({"pruner": "asha"}, ValueError, "pruner='asha' is not allowed"),
    ({"score": "mean"}, ValueError, "score='mean' is not allowed"),
    ({"space": None}, ValueError, "config mode needs both config and space (space is missing)"),
])
def test_bad_input_fails_before_any_trial(change: dict, error: type, message: str, config: dict,
                                          tmp_path: Path) -> None:
    out = tmp_path / "out"
    kwargs: dict[str, Any] = dict(config=config, space=SPACE, metric="val_loss", direction="minimize", n_trials=2,
                                  out=out, plots=False, show_progress_bar=False)
    kwargs.update(change)
    with pytest.raises(error) as info:
        optuna_search(**kwargs)
    assert message in str(info.value)
    assert _no_trial_ran(out)


def test_build_and_config_together_or_grid_with_build_are_refused(config: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="either build .* or config \\+ space, not both"):
        optuna_search(lambda t: None, config=config, space=SPACE, n_trials=1, out=tmp_path)
    with pytest.raises(ValueError, match="sampler='grid' needs a search space"):
        optuna_search(lambda t: None, metric="val_loss", direction="minimize", sampler="grid", n_trials=1,
                      out=tmp_path)
    with pytest.raises(TypeError, match="build must be a function"):
        optuna_search("build", metric="val_loss", direction="minimize", n_trials=1, out=tmp_path)  # type: ignore[arg-type]
    assert _no_trial_ran(tmp_path)


def test_a_value_the_config_rejects_fails_before_any_trial(config: dict, tmp_path: Path) -> None:
    space = {"trainer.callbacks.OptimizerCallback.name": {"choices": ["adamw", "adamx"]}}
    with pytest.raises(SearchSpaceError, match="OptimizerCallback.name='adamx'"):
        optuna_search(config=config, space=space, metric="val_loss", direction="minimize", n_trials=2,
                      out=tmp_path / "out", show_progress_bar=False)
    assert _no_trial_ran(tmp_path / "out")


def test_a_metric_the_module_never_logs_stops_the_first_trial_at_its_first_validation(config: dict,
                                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"has not logged 'val_los' by the end of validation at global step 2; "
                                         r"the logged metrics are: .*val_loss"):
        optuna_search(config=config, space=SPACE, metric="val_los", n_trials=3, out=out, show_progress_bar=False)
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL]  # the first trial, and no other


def test_a_study_with_another_direction_or_metric_is_refused(config: dict, tmp_path: Path) -> None:
    kwargs: dict[str, Any] = dict(config=config, space=SPACE, n_trials=1, out=tmp_path / "out", plots=False,
                                  show_progress_bar=False)
    optuna_search(**kwargs)
    with pytest.raises(ValueError, match="optimises minimize, not direction='maximize'"):
        optuna_search(**{**kwargs, "direction": "maximize", "metric": "val_acc"})
    with pytest.raises(ValueError, match="optimises 'val_loss', not metric='train_loss'"):
        optuna_search(**{**kwargs, "metric": "train_loss", "n_trials": 2})


# ---------------------------------------------------------------------------------------------------- storage, kill
def test_two_workers_creating_a_new_database_at_once_both_open_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the second of two workers starting on a new database lost the race to insert Optuna's schema
    version (sqlite3.IntegrityError: UNIQUE constraint failed: alembic_version.version_num) and stopped; now it
    opens the database the winner created."""
    import sqlalchemy.exc

    from lightning_techniques.search.optuna_search import open_storage

    real = optuna.storages.RDBStorage
    calls = []

    def racing(url: str, **kwargs: Any) -> Any:
        calls.append(url)
        if len(calls) == 1:
            real(url, **kwargs)  # the other worker creates the tables ...
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception(
                "UNIQUE constraint failed: alembic_version.version_num"))  # ... and this one loses the race
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = open_storage(None, tmp_path, heartbeat_interval=None)
    assert isinstance(storage, real) and len(calls) == 2
    monkeypatch.setattr(optuna.storages, "RDBStorage", lambda url, **kw: (_ for _ in ()).throw(
        sqlalchemy.exc.OperationalError("connect", {}, Exception("unable to open database file"))))
    with pytest.raises(ValueError, match="cannot be opened: OperationalError"):
        open_storage(None, tmp_path, heartbeat_interval=None)  # other errors are not retried


WORKER = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    import lightning as L
    import optuna
    from lightning.pytorch.callbacks import Callback
    from lightning_techniques.demo import DigitsCNN, DigitsDataModule
    from lightning_techniques.search import optuna_search

    out, mode, n_trials, storage = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class Marker(Callback):
        def __init__(self, trial):
            self.trial = trial
        def on_train_batch_end(self, trainer, *args):
            if mode == "kill" and self.trial.number == 1:
                (out / "in_trial_1").touch()
                time.sleep(0.5)  # the test kills the process here, mid-trial

    def build(trial):
        trial.set_user_attr("worker", os.getpid())
        lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            max_epochs=1, limit_train_batches=6, val_check_interval=3, limit_val_batches=1,
                            default_root_dir=str(out), callbacks=[Marker(trial)])
        return trainer, DigitsCNN(channels=4, lr=lr), DigitsDataModule(batch_size=32)

    if mode == "worker":  # start together with the other worker
        (out / f"ready_{os.getpid()}").touch()
        while len(list(out.glob("ready_*"))) < 2:
            time.sleep(0.05)
    optuna_search(build, metric="val_loss", direction="minimize", n_trials=n_trials, out=out, pruner="none",
                  storage=None if storage == "default" else storage, heartbeat_interval=1, grace_period=2,
                  show_progress_bar=False, plots=False, seed=None if mode == "worker" else 0)
''')


def _worker(tmp_path: Path, out: Path, mode: str, n_trials: int, storage: str = "default") -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, str(script), str(out), mode, str(n_trials), storage], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_sigkill_mid_trial_then_rerun_continues_the_study(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    proc = _worker(tmp_path, out, "kill", 3)
    deadline = time.monotonic() + 120
    while not (out / "in_trial_1").exists():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "the search never reached trial 1"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    storage = f"sqlite:///{out / 'study.db'}"
    before = optuna.load_study(study_name="search", storage=storage).trials
    assert [t.state for t in before] == [TrialState.COMPLETE, TrialState.RUNNING]
    time.sleep(2.5)  # the killed trial's heartbeat is now older than grace_period=2
    _finish(_worker(tmp_path, out, "resume", 3))
    after = optuna.load_study(study_name="search", storage=storage).trials
    assert after[0].state == TrialState.COMPLETE and after[0].value == before[0].value  # nothing finished is lost
    assert after[1].state == TrialState.FAIL  # the interrupted trial is marked failed ...
    retried = [t for t in after if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE  # ... and run again with its values
    assert retried[0].params == before[1].params
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3  # the n_trials target counts finished ones


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["default", "journal"])
def test_two_workers_share_one_study(storage: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    url = "default" if storage == "default" else str(out / "study.journal")
    workers = [_worker(tmp_path, out, "worker", 8, url) for _ in range(2)]
    for proc in workers:
        _finish(proc)
    if storage == "default":
        loaded = optuna.load_study(study_name="search", storage=f"sqlite:///{out / 'study.db'}")
    else:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        loaded = optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(url)))
    trials = loaded.trials
    assert {t.user_attrs["worker"] for t in trials} == {p.pid for p in workers}  # both workers ran trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert 8 <= len(trials) <= 9  # the shared target (a worker may start one more while the other finishes)
    assert sorted(t.number for t in trials) == list(range(len(trials)))


# ---------------------------------------------------------------------------------------------------- PostgreSQL
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres_url() -> Any:
    """A real PostgreSQL server in a temporary folder (as an unprivileged user when run as root); skipped with the
    reason when it cannot start."""
    binaries = {name: shutil.which(name) or f"/usr/local/bin/{name}" for name in ("initdb", "pg_ctl")}
    missing = [name for name, path in binaries.items() if not Path(path).exists()]
    if missing:
        pytest.skip(f"PostgreSQL server binaries not found: {', '.join(missing)}")
    folder = Path(tempfile.mkdtemp(prefix="lt-pg-", dir="/tmp"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(folder, ignore_errors=True)
            pytest.skip("running as root and `runuser` is missing: postgres refuses to run as root")
        shutil.chown(folder, user="nobody")
        prefix = [runuser, "-u", "nobody", "--"]
    port = _free_port()
    data = folder / "data"

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120, cwd=folder)

    init = run(binaries["initdb"], "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed (exit {init.returncode}): {init.stderr.strip()[-500:]}")
    start = run(binaries["pg_ctl"], "-D", str(data), "-l", str(folder / "server.log"), "-w", "-t", "60",
                "-o", f"-p {port} -h 127.0.0.1 -k {folder}", "start")
    if start.returncode != 0:
        log = (folder / "server.log").read_text()[-500:] if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start (exit {start.returncode}): {start.stderr.strip()[-300:]} {log}")
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        run(binaries["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_postgresql_storage(postgres_url: str, config: dict, tmp_path: Path) -> None:
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary; in the dev extra)")
    kwargs: dict[str, Any] = dict(config=config, space=SPACE, n_trials=2, storage=postgres_url, study_name="pg",
                                  out=tmp_path / "out", plots=False, show_progress_bar=False, sampler="random")
    first = optuna_search(**kwargs)
    assert first.counts["complete"] == 2
    again = optuna_search(**{**kwargs, "n_trials": 3})  # a second run (another machine, say) joins the study
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert again.best_value == min(t.value for t in study.trials)
    assert not (tmp_path / "out" / "study.db").exists()  # nothing went to the default SQLite file


def test_best_config_of_a_conditional_space_has_only_the_branch_taken(config: dict, tmp_path: Path) -> None:
    space = SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml")
    result = optuna_search(config=config, space=space, n_trials=2, sampler="random", seed=3, pruner="none",
                           out=tmp_path / "out", plots=False, show_progress_bar=False)
    assert result.best_config is not None
    optimizer = result.best_params["trainer.callbacks.OptimizerCallback.name"]
    args = result.best_config["trainer"]["callbacks"][0]["init_args"]
    assert args["name"] == optimizer and args["lr"] == result.best_params[f"{optimizer}_lr"]
    assert {k for k in result.best_params if k.endswith("_lr")} == {f"{optimizer}_lr"}


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_trials_rank_zero_searches_and_rank_one_replays(tmp_path: Path) -> None:
    from lightning_techniques.testing import assert_ranks_agree, run_ddp_script

    results = run_ddp_script(Path(__file__).parent / "ddp" / "ddp_search_driver.py", tmp_path)
    assert_ranks_agree(results, keys=["runs", "finished"])
    rank0, rank1 = results
    assert rank0["returned"] and not rank1["returned"]  # rank 1 never opened the study
    assert rank0["states"] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert [run["lr"] for run in rank1["runs"]] == rank0["params"]  # rank 1 trained rank 0's values
    steps = [run["global_step"] for run in rank1["runs"]]
    assert steps == [8, 4, 8]  # the pruned trial stopped on both ranks at the same step
    assert [run["pruned"] for run in rank1["runs"]] == [False, True, False]
