"""Reproducibility techniques: what an exact resume needs beyond Lightning's own checkpoint."""

from lightning_techniques.reproducibility.rng_state import RNGStateCheckpoint

__all__ = ["RNGStateCheckpoint"]
