"""Data-side techniques: curriculum learning and class imbalance."""

__all__: list[str] = []
