"""On-device augmentation, MixUp/CutMix and input-noise injection."""

from lightning_techniques.augment.image import ImageAugmentation, augment_images, build_augmentation
from lightning_techniques.augment.input_noise import InputNoise, add_noise, scheduled_scale
from lightning_techniques.augment.mixing import CutMix, MixUp, SoftTargetNLLLoss, cutmix, mixup, soft_targets

__all__: list[str] = [
    "CutMix",
    "ImageAugmentation",
    "InputNoise",
    "MixUp",
    "SoftTargetNLLLoss",
    "add_noise",
    "augment_images",
    "build_augmentation",
    "cutmix",
    "mixup",
    "scheduled_scale",
    "soft_targets",
]
