"""Regularisation techniques."""

from lightning_techniques.regularization.early_stopping import EarlyStopping

__all__ = ["EarlyStopping"]
