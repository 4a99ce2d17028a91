"""Hyperparameter search on a stock Trainer: Optuna (pruning callback, search driver) and Ray Tune."""

from lightning_techniques.search.space import SearchSpace, SearchSpaceError

__all__: list[str] = ["SearchSpace", "SearchSpaceError"]
