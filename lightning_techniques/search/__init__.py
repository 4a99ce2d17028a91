"""Hyperparameter search on a stock Trainer: Optuna (pruning callback, search driver) and Ray Tune."""

__all__: list[str] = []
