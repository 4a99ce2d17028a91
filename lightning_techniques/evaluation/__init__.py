"""Evaluation reports and importance measures."""

__all__: list[str] = []
