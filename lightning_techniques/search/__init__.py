"""Hyperparameter search on a stock Trainer: Optuna (pruning callback, search driver) and Ray Tune."""

from lightning_techniques.search.optuna_search import SearchResult, optuna_search
from lightning_techniques.search.pruning import OptunaPruning
from lightning_techniques.search.ray_tune import RaySearchResult, RayTuneReport, ray_search
from lightning_techniques.search.space import SearchSpace, SearchSpaceError

__all__: list[str] = ["OptunaPruning", "RaySearchResult", "RayTuneReport", "SearchResult", "SearchSpace",
                      "SearchSpaceError", "optuna_search", "ray_search"]
