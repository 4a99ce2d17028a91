"""Builds notebooks/06_hyperparameter_search.ipynb: ``python notebooks/_build_06_hyperparameter_search.py`` from the
repository root.

The one builder format (see ``_nbtools.py``): ``NOTEBOOK`` and ``CELLS``; tests/test_notebooks.py checks that the
committed notebook holds exactly these cells."""

from __future__ import annotations

NOTEBOOK = "06_hyperparameter_search.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Hyperparameter search on a stock Trainer: Optuna and Ray Tune

Both drivers search the **same** LightningCLI config with the **same** search-space YAML: each trial is the config with the trial's values written in, built exactly as `lightning-techniques fit --config` builds it, and the best trial comes back as a ready-to-run config file.

1. **`optuna_search`** (Akiba et al. 2019): TPE with `OptunaPruning` stopping unpromising runs (median pruner), a study in an SQLite file (a rerun continues it), Optuna's plots;
2. **`ray_search`** (Liaw et al. 2018): the trials on a local Ray cluster started with 2 CPUs and stopped at the end, ASHA (Li et al. 2020) stopping bad trials early, `RayTuneReport` saving a checkpoint with every report so a trial can resume.

The task: scikit-learn's bundled handwritten digits (no download), a small CNN, a few short epochs per trial."""),
    ("code", """import logging, tempfile, warnings
from pathlib import Path
warnings.filterwarnings('ignore')  # first: an import's tqdm warns that ipywidgets is missing
import optuna, torch, yaml
from IPython.display import Image, display

from lightning_techniques.search import SearchSpace, optuna_search, ray_search

torch.set_num_threads(1)  # tiny models: one thread is fastest
optuna.logging.set_verbosity(optuna.logging.WARNING)
logging.getLogger('lightning.pytorch').setLevel(logging.ERROR)
root = Path(tempfile.mkdtemp())"""),
    ("md", """## The config and the search space

An ordinary LightningCLI config (that of `configs/search/digits.yaml`: `OptimizerCallback`, `LRSchedule`, `LSUVInit` on a `DigitsCNN`, shortened to 4 epochs of 15 batches of 32 so the notebook runs in about a minute). The space says what varies - paths into the config, a callback by its class name, each optimizer with its own learning-rate range (conditional parameters):"""),
    ("code", """config = yaml.safe_load('''
seed_everything: 0
torch_threads: 1
trainer:
  max_epochs: 4
  limit_train_batches: 15
  limit_val_batches: 3
  num_sanity_val_steps: 0
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_techniques.OptimizerCallback
      init_args: {name: adamw, lr: 0.003, weight_decay: 0.01}
    - class_path: lightning_techniques.LRSchedule
      init_args: {schedule: cosine, warmup_fraction: 0.05}
    - class_path: lightning_techniques.LSUVInit
model:
  class_path: lightning_techniques.demo.DigitsCNN
  init_args: {channels: 8}
data:
  class_path: lightning_techniques.demo.DigitsDataModule
  init_args: {batch_size: 32}
''')
space_yaml = '''
metric: val_loss
direction: minimize
parameters:
  trainer.callbacks.LRSchedule.warmup_fraction: {type: float, low: 0.0, high: 0.3}
  trainer.callbacks.OptimizerCallback.name:
    choices: [sgd, adamw]
    when:
      sgd:
        trainer.callbacks.OptimizerCallback.lr: {name: sgd_lr, type: float, low: 1.0e-2, high: 1.0, log: true}
      adamw:
        trainer.callbacks.OptimizerCallback.lr: {name: adamw_lr, type: float, low: 1.0e-3, high: 0.1, log: true}
'''
space = SearchSpace.from_yaml(space_yaml)
space.check(config)  # every path leads to an argument of the config's classes (else: an error naming it)
space.names"""),
    ("md", """## Optuna: TPE with pruning

`OptunaPruning` reports `val_loss` at every validation (by global step); the median pruner stops a trial whose value is worse than the median of earlier trials at the same step."""),
    ("code", """result = optuna_search(config=config, space=space, n_trials=12, sampler='tpe', pruner='median', seed=0,
                       out=root / 'optuna', show_progress_bar=False)
print(f"{result.counts['complete']} complete, {result.counts['pruned']} pruned")
print(f"best trial {result.best_trial}: val_loss = {result.best_value:.4f}")
for name, value in result.best_params.items():
    print(f"  {name}: {value:.4g}" if isinstance(value, float) else f"  {name}: {value}")"""),
    ("md", """Optuna's standard plots, written by the search as PNG files next to the study: the optimisation history, the parameters' importances, the parallel coordinates of every trial, and the intermediate values (the pruned trials' curves end early)."""),
    ("code", """for name in ('optimization_history', 'param_importances', 'parallel_coordinate', 'intermediate_values'):
    if name in result.plots:
        display(Image(filename=str(result.plots[name]), width=560))
    else:
        print(name, 'not drawn:', result.skipped_plots[name])"""),
    ("md", """The best configuration is the base config with the best trial's values written in - a file `lightning-techniques fit --config best_config.yaml` runs as it is:"""),
    ("code", """best = yaml.safe_load(result.best_config_path.read_text())
print(yaml.safe_dump({'trainer': {'callbacks': best['trainer']['callbacks'][:2]}}, sort_keys=False))"""),
    ("md", """## Ray Tune: the same space, ASHA on a local 2-CPU cluster

`ray_search` starts a local Ray cluster with `num_cpus=2`, runs the trials two at a time (one CPU each), and stops the cluster at the end (or uses an existing one: `address=...`). ASHA compares trials at every validation count 1, 2, 4 and stops those below the median at a rung. Ray's session files go to the output folder, not the home directory; a second call with the same `out` restores the experiment and continues unfinished trials from their checkpoints."""),
    ("code", """ray_result = ray_search(config=config, space=space, num_samples=6, num_cpus=2, cpus_per_trial=1,
                        scheduler='asha', grace_period=1, reduction_factor=2, seed=0, out=root / 'ray')
frame = ray_result.results.get_dataframe()
print(f"{len(frame)} trials, ASHA stopped {len(ray_result.stopped_early)} early")
print(f"best: val_loss = {ray_result.best_value:.4f} with", {k: (round(v, 4) if isinstance(v, float) else v)
                                                          for k, v in ray_result.best_params.items()})"""),
    ("md", """Each trial's reported `val_loss` by validation: the trials ASHA stopped end early."""),
    ("code", """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3))
for trial in ray_result.results:
    history = trial.metrics_dataframe
    stopped = trial.metrics['trial_id'] in ray_result.stopped_early
    ax.plot(history['training_iteration'], history['val_loss'], marker='o', ls=':' if stopped else '-',
            label=('stopped ' if stopped else '') + trial.metrics['trial_id'][-2:])
ax.set_xlabel('validation (Ray training_iteration)'); ax.set_ylabel('val_loss'); ax.set_title('Ray Tune + ASHA')
ax.legend(fontsize=7, ncol=2)
plt.show()"""),
    ("md", """Both searches wrote the same kind of result: a ready-to-run `best_config.yaml` (from Ray: next to the experiment folder, with the best trial's latest Lightning checkpoint in `ray_result.best_checkpoint`)."""),
    ("code", """print('optuna:', sorted(p.name for p in result.out.iterdir() if p.suffix in ('.yaml', '.db', '.csv')))
print('ray:   ', sorted(p.name for p in ray_result.out.iterdir() if p.suffix in ('.yaml', '.csv')))
print('ray checkpoint:', ray_result.best_checkpoint.name)"""),
]

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _nbtools import build

    build(NOTEBOOK, CELLS)
