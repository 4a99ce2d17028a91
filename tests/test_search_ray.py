"""RayTuneReport and ray_search: real searches on real local Ray clusters (2 CPUs), ASHA early stopping, the best
config as ready-to-run YAML, trials resumed from their checkpoints after a failure and after Tuner.restore, nothing
written to $HOME, bad input refused before any cluster starts.

Two cluster start-ups in all: one by the driver itself (started and stopped by ``ray_search``), one module-scoped
(``ray_cluster``) that ``ray_search`` finds already initialised and leaves running.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import yaml

pytest.importorskip("ray.tune")

from lightning_techniques.demo import DigitsCNN, DigitsDataModule  # noqa: E402
from lightning_techniques.search import RaySearchResult, RayTuneReport, SearchSpaceError, ray_search  # noqa: E402
from lightning_techniques.search.ray_tune import param_space, ray_cluster, sample_values  # noqa: E402
from lightning_techniques.search.space import SearchSpace, load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LR = "trainer.callbacks.OptimizerCallback.lr"
SPACE = {"metric": "val_loss", "direction": "minimize",
         "parameters": {LR: {"type": "float", "low": 1.0e-5, "high": 0.3, "log": True}}}


def _config() -> dict:
    """configs/search/digits.yaml made tiny: 4 channels, 3 epochs of 4 batches, one validation batch per epoch."""
    base = load_config(ROOT / "configs/search/digits.yaml")
    base["model"]["init_args"]["channels"] = 4
    base["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=1, num_sanity_val_steps=0,
                           logger=False, enable_checkpointing=False)
    return base


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------------- no cluster
def test_callback_outside_a_tune_session_records_and_checks_the_monitor(tmp_path: Path) -> None:
    """A plain fit: every validation is recorded by global step (no report, no checkpoint file); a metric the
    module never logs stops the run at the first validation, naming the logged metrics."""
    report = RayTuneReport(monitor=["val_loss", "val_acc"])
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[report])
    trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))
    assert sorted(report.reported) == [2, 4]
    assert set(report.reported[4]) == {"val_loss", "val_acc"}
    assert report.reported[4]["val_loss"] == pytest.approx(float(trainer.callback_metrics["val_loss"]))
    assert _files(tmp_path) == []
    typo = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[RayTuneReport(monitor="val_los")])
    with pytest.raises(ValueError, match=r"val_los.*global step 2.*val_acc, val_loss"):
        typo.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))


def test_callback_bad_arguments() -> None:
    with pytest.raises(ValueError, match="monitor"):
        RayTuneReport(monitor=[])
    with pytest.raises(ValueError, match="clash"):
        RayTuneReport(monitor="step")
    with pytest.raises(TypeError, match="checkpoint"):
        RayTuneReport(checkpoint="yes")  # type: ignore[arg-type]


def test_the_optuna_space_file_converts_to_ray_domains() -> None:
    """configs/search/digits_space.yaml (conditional optimizer branches): every parameter gets a Ray domain; a Ray
    sample maps back to the active parameters only, with choices as written, and applies to the config."""
    space = SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml")
    domains = param_space(space)
    assert set(domains) == set(space.names)
    base = load_config(ROOT / "configs/search/digits.yaml")
    seen = set()
    for seed in range(12):
        import numpy as np

        rng = np.random.default_rng(seed)
        sample = {name: domain.sample(random_state=rng) for name, domain in domains.items()}
        values = sample_values(space, sample)
        optimizer = values["trainer.callbacks.OptimizerCallback.name"]
        seen.add(optimizer)
        assert {"sgd_lr" in values, "adamw_lr" in values} == {True, False}
        assert ("sgd_lr" in values) == (optimizer == "sgd")
        assert values["model.init_args.channels"] in (8, 16, 24, 32)
        lr = values.get("sgd_lr", values.get("adamw_lr"))
        assert (3e-3 <= lr <= 0.3) if optimizer == "sgd" else (3e-4 <= lr <= 3e-2)
        applied = space.apply(base, values)
        callbacks = {cb["class_path"].rpartition(".")[2]: cb for cb in applied["trainer"]["callbacks"]}
        assert callbacks["OptimizerCallback"]["init_args"]["name"] == optimizer
        assert callbacks["OptimizerCallback"]["init_args"]["lr"] == lr
    assert seen == {"sgd", "adamw"}


@pytest.mark.parametrize("space, match", [
    ({"trainer.callbacks.OptimizerCallback.lrr": {"type": "float", "low": 0.001, "high": 0.1}}, "takes no argument"),
    ({"trainer.callbacks.Nope.lr": {"type": "float", "low": 0.001, "high": 0.1}}, "has no Nope"),
    ({LR: {"type": "float", "low": 0.1, "high": 0.001}}, "inverted range"),
])
def test_bad_space_fails_before_any_cluster_starts(space: dict, match: str, tmp_path: Path) -> None:
    import ray

    with pytest.raises(SearchSpaceError, match=match):
        ray_search(config=_config(), space=space, metric="val_loss", direction="minimize", out=tmp_path)
    assert not ray.is_initialized()
    assert not (tmp_path / "ray_tmp").exists()


def test_bad_arguments_fail_before_any_cluster_starts(tmp_path: Path) -> None:
    import ray

    cases: list[tuple[dict[str, Any], str]] = [
        ({"metric": None, "space": {"parameters": SPACE["parameters"]}}, "metric is required"),
        ({"direction": "up"}, "direction"),
        ({"num_samples": 0}, "num_samples"),
        ({"reduction_factor": 1}, "reduction_factor"),
        ({"grace_period": 5, "max_t": 2}, "max_t"),
        ({"cpus_per_trial": 4, "num_cpus": 2}, "cpus_per_trial"),
        ({"scheduler": "hyperband"}, "scheduler"),
        ({"config": None}, "give config"),
    ]
    for overrides, match in cases:
        kwargs: dict[str, Any] = {"config": _config(), "space": SPACE, "out": tmp_path, **overrides}
        with pytest.raises((ValueError, TypeError), match=match):
            ray_search(**kwargs)
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------------------------------- real clusters
@pytest.mark.slow
def test_driver_starts_a_bounded_cluster_asha_stops_bad_trials_and_home_is_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ray_search starts a local 2-CPU cluster and stops it; ASHA stops the trials below the median of those before
    them at a rung (one trial at a time, so the order is fixed; the decisions are replayed from the reported losses); the best trial is the lowest val_loss
    reported, its values are written into a ready-to-run best_config.yaml that builds; nothing lands in $HOME
    (matplotlib's own cache, imported by torchmetrics, goes to MPLCONFIGDIR), no auth token file anywhere."""
    import ray

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_TMPDIR"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "o"
    result = ray_search(config=_config(), space=SPACE, num_samples=4, num_cpus=2, max_concurrent_trials=1,
                        grace_period=1, reduction_factor=2, out=out, seed=0)
    assert not ray.is_initialized()  # the driver's cluster is stopped
    assert "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_MODE" not in os.environ  # the token is gone with it
    # (ray.init sets RAY_AUTH_MODE in this process: left set, the module's second cluster would not start)
    assert _files(home) == []

    assert isinstance(result, RaySearchResult)
    frame = result.results.get_dataframe()
    assert len(frame) == 4 and result.counts == {"terminated": 4}
    iterations = dict(zip(frame["trial_id"], frame["training_iteration"]))
    assert max(iterations.values()) == 3  # a trial that ran its 3 epochs reported 3 validations
    # ASHA's decisions replayed from the reported losses (trials ran one at a time, in trial-id order): at each
    # rung (grace_period 1, reduction factor 2: iterations 1, 2, 4, ...) a trial stops when it is worse than the
    # median of the trials recorded there before it. Whether any trial deserves stopping depends on the sampled
    # learning rates (and on float noise between machines), so the test checks that the driver's scheduler made
    # exactly the decisions ASHA's rule gives - not that some trial was stopped.
    losses = {r.metrics["trial_id"]: list(r.metrics_dataframe.sort_values("training_iteration")["val_loss"])
              for r in result.results}
    rungs: dict[int, list[float]] = {}
    expected = []
    for trial in sorted(losses):
        for iteration, loss in enumerate(losses[trial], 1):
            if iteration & (iteration - 1):  # not a rung (1, 2, 4, ...)
                continue
            recorded = rungs.setdefault(iteration, [])
            stop = bool(recorded) and -loss < float(np.nanpercentile([-v for v in recorded], 50))
            recorded.append(loss)
            if stop:
                expected.append(trial)
                break
    assert expected, "the seed's learning rates put a worse trial after a better one: ASHA has something to stop"
    assert sorted(result.stopped_early) == sorted(expected)
    assert all(len(losses[t]) < 3 for t in expected) and all(len(losses[t]) == 3 for t in losses if t not in expected)
    history = {r.metrics["trial_id"]: r.metrics_dataframe["val_loss"].min() for r in result.results}
    assert result.best_value == pytest.approx(min(history.values()))
    assert result.best_trial == min(history, key=history.__getitem__)
    assert (result.experiment.parent, result.experiment.name) == (out.resolve(), "search")
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()

    written = yaml.safe_load(result.best_config_path.read_text())
    callbacks = {cb["class_path"].rpartition(".")[2]: cb for cb in written["trainer"]["callbacks"]}
    assert callbacks["OptimizerCallback"]["init_args"]["lr"] == pytest.approx(result.best_params[LR])
    assert yaml.safe_load((out / "best_params.yaml").read_text())["params"] == result.best_params
    from lightning_techniques.search.space import build_from_config

    trainer, module, data = build_from_config(written, default_root_dir=tmp_path / "rerun")
    trainer.fit(module, datamodule=data)  # ready to run
    assert not (tmp_path / "mpl").exists() or _files(home) == []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One local 2-CPU cluster for the rest of the module (ray_search finds it initialised and leaves it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the build function below, for the workers
    with ray_cluster(num_cpus=2, temp_dir=tmp_path_factory.mktemp("rt")) as info:
        yield info


class FailOnce(L.Callback):
    """Records where each run started; with ``fail``, the first run of the trial raises after its second validation
    (its checkpoint of step 4 is then the trial's latest)."""

    def __init__(self, folder: str, fail: bool) -> None:
        self.folder = Path(folder)
        self.fail = fail

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with open(self.folder / "starts.txt", "a") as handle:
            handle.write(f"{trainer.global_step}\n")

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        marker = self.folder / "failed"
        if self.fail and trainer.global_step == 5 and not marker.exists():
            marker.write_text("once")
            raise RuntimeError("injected failure after the checkpoint of step 4")


def _build(values: dict[str, Any], folder: str, fail: bool) -> tuple[Any, Any, Any]:
    trainer = L.Trainer(max_steps=8, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[RayTuneReport(monitor="val_loss"), FailOnce(folder, fail)],
                        default_root_dir=folder)
    return trainer, DigitsCNN(channels=4, lr=values[LR]), DigitsDataModule(batch_size=32)


@pytest.mark.slow
def test_restore_continues_an_errored_trial_from_its_checkpoint(cluster: Any, tmp_path: Path) -> None:
    """build mode on an existing cluster (left running). The trial fails mid-run (max_failures=0): the search ends
    with it in error after two reports. ray_search again with the same out/name restores the experiment
    (Tuner.restore): the trial continues from its last reported checkpoint (its run starts at step 4, not 0), runs
    to the end and reports every step once."""
    import functools

    import ray

    space = {"parameters": {LR: {"type": "float", "low": 1.0e-3, "high": 3.0e-2, "log": True}}}
    kwargs: dict[str, Any] = dict(space=space, metric="val_loss", direction="minimize", num_samples=1,
                                  scheduler="fifo", max_failures=0, out=tmp_path / "o", seed=0)
    first = ray_search(functools.partial(_build, folder=str(tmp_path), fail=True), **kwargs)
    assert ray.is_initialized()  # the fixture's cluster is left running
    assert first.counts == {"error": 1} and not first.restored
    assert (tmp_path / "starts.txt").read_text().split() == ["0"]
    assert list(first.results[0].metrics_dataframe["step"]) == [2, 4]

    second = ray_search(functools.partial(_build, folder=str(tmp_path), fail=False), **kwargs)
    assert second.restored and second.counts == {"terminated": 1}
    assert (tmp_path / "starts.txt").read_text().split() == ["0", "4"]  # resumed from the step-4 checkpoint
    assert list(second.results[0].metrics_dataframe["step"])[-2:] == [6, 8]
    assert second.results[0].metrics["training_iteration"] == 4  # steps 2, 4, 6, 8: none reported twice
    assert second.best_params == first.best_params
