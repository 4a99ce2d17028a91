"""Optimisation: optimizers, LR schedules, clipping, accumulation, mixed precision, non-finite guard."""

__all__: list[str] = []

# --- optimizers and learning-rate schedules ---

# --- clipping, accumulation, precision, non-finite guard ---
from lightning_techniques.optim.guard import NonFiniteGuard, NonFiniteTrainingError  # noqa: E402

__all__ += ["NonFiniteGuard", "NonFiniteTrainingError"]
