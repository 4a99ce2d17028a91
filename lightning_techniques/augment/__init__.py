"""On-device augmentation, MixUp/CutMix and input-noise injection."""

__all__: list[str] = []
