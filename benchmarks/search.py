"""Hyperparameter search evidence: samplers on a known objective, and what pruning saves on the demo task.

    python -m benchmarks.search --part samplers [--seeds 10] [--trials 60]
    python -m benchmarks.search --part pruning [--seeds 3] [--trials 16]

``samplers``: the 6-dimensional Hartmann function (Dixon & Szegő 1978; global minimum -3.32237), a standard test of
Bayesian optimisation, written as a search space of six floats in [0, 1] and minimised by each sampler with the same
budget of trials, seeds side by side (TPE - Optuna's default Bayesian optimiser, Gaussian-process BO, CMA-ES, random).
Pure Optuna objective: cheap, exact, no training noise.

``pruning``: ``optuna_search`` over the bundled digits search (``configs/search/digits.yaml`` +
``configs/search/digits_space.yaml``, 6 epochs) with the median pruner (as built by name, and with a warm-up) vs.
without, the same random-sampler seed in every arm so all see the same trials; counts the optimizer steps trained (a pruned trial stops right after the
validation that pruned it) and compares the best validation accuracy found.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from benchmarks.runner import markdown_table, record
from lightning_techniques.search import SearchSpace, optuna_search
from lightning_techniques.search.optuna_search import make_sampler
from lightning_techniques.search.space import load_config

ROOT = Path(__file__).resolve().parents[1]

# Hartmann 6-D constants (Dixon & Szegő 1978)
_ALPHA = [1.0, 1.2, 3.0, 3.2]
_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
_P = [[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
      [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]]
HARTMANN6_MIN = -3.32237


def hartmann6(x: list[float]) -> float:
    return -sum(_ALPHA[i] * math.exp(-sum(_A[i][j] * (x[j] - _P[i][j]) ** 2 for j in range(6))) for i in range(4))


HARTMANN_SPACE = SearchSpace.from_dict({f"x{j}": {"type": "float", "low": 0.0, "high": 1.0} for j in range(6)})


def best_after(name: str, seed: int, trials: int) -> tuple[float, float]:
    """Best Hartmann value found by sampler ``name`` in ``trials`` trials, and the CPU seconds it took."""
    study = optuna.create_study(sampler=make_sampler(name, seed=seed, space=HARTMANN_SPACE))
    start = time.process_time()
    study.optimize(lambda t: hartmann6([HARTMANN_SPACE.suggest(t)[f"x{j}"] for j in range(6)]), n_trials=trials)
    return float(study.best_value), time.process_time() - start


def samplers(seeds: int, trials: int) -> None:
    names = ["tpe", "gp", "cmaes", "random"]
    results: dict[str, list[float]] = {n: [] for n in names}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for seed in range(seeds):
        for name in names:  # round-robin: every sampler on this seed before the next seed
            value, cpu = best_after(name, seed, trials)
            results[name].append(value)
            seconds[name].append(cpu)
    rows = []
    for name in names:
        gap = [v - HARTMANN6_MIN for v in results[name]]
        rows.append({
            "sampler": name,
            "best value per seed": ", ".join(f"{v:.3f}" for v in results[name]),
            "median best": statistics.median(results[name]),
            "mean best": statistics.mean(results[name]),
            "median gap to optimum": statistics.median(gap),
            "seeds better than random": "-" if name == "random" else
            f"{sum(a < b for a, b in zip(results[name], results['random'], strict=True))}/{seeds}",
            "CPU s per study (median)": statistics.median(seconds[name]),
        })
    body = (
        f"Minimising the 6-D Hartmann function (global minimum {HARTMANN6_MIN}) over [0, 1]^6 written as a search "
        f"space (six `type: float` parameters), {trials} trials per study, seeds 0-{seeds - 1}; each sampler as "
        f"`optuna_search` builds it (`make_sampler`): TPE multivariate, GPSampler, CmaEsSampler, RandomSampler. "
        f"Lower is better.\n\n{markdown_table(rows)}\n\nCPU seconds are the sampler's own cost on a shared, busy "
        f"2-core machine (8 users): a guide, not a measurement; the best values are exact.\n\n"
        f"Command: `python -m benchmarks.search --part samplers --seeds {seeds} --trials {trials}`"
    )
    record("search_samplers", "Search: TPE / GP / CMA-ES vs. random on a known objective (Hartmann-6)", body)


def pruning(seeds: int, trials: int) -> None:
    base = load_config(ROOT / "configs/search/digits.yaml")
    base["trainer"]["max_epochs"] = 6
    base["trainer"]["logger"] = False
    base["trainer"]["enable_checkpointing"] = False
    space = SearchSpace.from_yaml(ROOT / "configs/search/digits_space.yaml")
    rows = []
    per_arm: dict[str, dict[str, list[float]]] = {}
    for seed in range(seeds):
        arms: dict[str, Any] = {
            "none": "none",
            "median": "median",
            # no pruning before 2 of the 6 epochs (40 optimizer steps at batch 64): early curves cross
            "median, warm-up 40 steps": optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=40),
        }
        for arm, pruner in arms.items():  # round-robin
            with tempfile.TemporaryDirectory(prefix="lt-bench-search-") as folder:
                start, cpu = time.perf_counter(), time.process_time()
                result = optuna_search(config=base, space=space, n_trials=trials, sampler="random", seed=seed,
                                       pruner=pruner, out=folder, plots=False, show_progress_bar=False)
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                study = result.study
            steps = sum(max(t.intermediate_values, default=0) for t in study.trials)
            pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
            stats = per_arm.setdefault(arm, {"steps": [], "best": [], "wall": [], "cpu": []})
            stats["steps"].append(steps)
            stats["best"].append(result.best_value)
            stats["wall"].append(wall)
            stats["cpu"].append(cpu)
            rows.append({"seed": seed, "pruner": arm, "trials": len(study.trials), "pruned": pruned,
                         "optimizer steps trained": steps, "best val_acc": result.best_value,
                         "best trial": result.best_trial, "wall s": wall, "CPU s": cpu})
    summary = []
    for arm in list(arms)[1:]:
        saved = [1 - m / n for m, n in zip(per_arm[arm]["steps"], per_arm["none"]["steps"], strict=True)]
        same = sum(abs(a - b) < 1e-9 for a, b in zip(per_arm[arm]["best"], per_arm["none"]["best"], strict=True))
        summary.append(
            f"- **{arm}**: optimizer steps saved per seed {', '.join(f'{x:.1%}' for x in saved)} (median "
            f"{statistics.median(saved):.1%}); best val_acc identical to no pruning in {same}/{seeds} seeds "
            f"(per seed {', '.join(f'{b:.4f}' for b in per_arm[arm]['best'])} vs. "
            f"{', '.join(f'{b:.4f}' for b in per_arm['none']['best'])})")
    body = (
        f"`optuna_search` over `configs/search/digits.yaml` (6 epochs, validation once per epoch) with "
        f"`configs/search/digits_space.yaml` (channels, LR-schedule warm-up, optimizer with a per-optimizer LR and "
        f"AdamW's weight decay), {trials} trials, random sampler with the same seed in both arms (the same trial "
        f"parameters, so the arms differ only by pruning), trial value = best validation accuracy. Median pruner: "
        f"`MedianPruner(n_startup_trials=5)` (what `pruner=\"median\"` builds), and the same with "
        f"`n_warmup_steps=40`; trials are compared at equal global steps.\n\n{markdown_table(rows)}\n\n"
        + "\n".join(summary) + "\n\nSteps and accuracies are exact; wall/CPU seconds "
        f"come from a shared, busy 2-core machine (8 users) and are only a guide.\n\n"
        f"Command: `python -m benchmarks.search --part pruning --seeds {seeds} --trials {trials}`"
    )
    record("search_pruning", "Search: compute saved by pruning on the digits search at equal best score", body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["samplers", "pruning"], required=True)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--trials", type=int, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.part == "samplers":
        samplers(args.seeds or 10, args.trials or 60)
    else:
        pruning(args.seeds or 3, args.trials or 16)


if __name__ == "__main__":
    main()
