"""On-device image augmentation of tensor batches with kornia: flips, rotation, colour jitter, each with its own
probability, in training only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_techniques._internal.batch import get_inputs, set_inputs
from lightning_techniques._internal.batch_transforms import BatchTransformCallback
from lightning_techniques._internal.optional import require
from lightning_techniques._internal.validation import check_non_negative, check_number, check_probability
from lightning_techniques.augment._seeding import StepSeeder, default_seed

# ---------------------------------------------------------------------------------------------------------------- core


def build_augmentation(
    hflip_p: float = 0.5,
    vflip_p: float = 0.0,
    rotation_degrees: float = 0.0,
    rotation_p: float = 0.5,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    color_p: float = 0.5,
) -> nn.Sequential:
    """The kornia pipeline (flips -> rotation -> colour jitter); a technique with probability 0 or magnitude 0 is
    left out. Works on ``[B, C, H, W]`` float tensors on any device."""
    K = require("kornia.augmentation", "augment", "Image augmentation").__dict__
    steps: list[nn.Module] = []
    if hflip_p > 0:
        steps.append(K["RandomHorizontalFlip"](p=hflip_p))
    if vflip_p > 0:
        steps.append(K["RandomVerticalFlip"](p=vflip_p))
    if rotation_degrees > 0 and rotation_p > 0:
        steps.append(K["RandomRotation"](degrees=float(rotation_degrees), p=rotation_p))
    if color_p > 0 and (brightness > 0 or contrast > 0 or saturation > 0 or hue > 0):
        steps.append(K["ColorJitter"](brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                                      p=color_p))
    return nn.Sequential(*steps)


def _seed_global_rng(seed: int, device: torch.device) -> None:
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def augment_images(augmentation: nn.Module, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply ``augmentation`` to ``x [B, C, H, W]`` with its random parameters drawn from ``seed``.

    kornia draws from the global torch RNG (it takes no generator), so the draw happens inside
    ``torch.random.fork_rng``: the global RNG is seeded for this call and restored afterwards, leaving every other
    random stream of the run (dropout, shuffling) untouched.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"image augmentation needs a float [B, C, H, W] input, got {x.dtype} of shape {tuple(x.shape)}.")
    devices = [x.device] if x.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type if devices else "cuda"):
        _seed_global_rng(seed, x.device)
        return augmentation(x)


# ------------------------------------------------------------------------------------------------------------ adapter


class ImageAugmentation(BatchTransformCallback):
    """Randomly flip, rotate and colour-jitter the image batch on the device before ``training_step``.

    Classic data augmentation for image classifiers (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with
    Deep Convolutional Neural Networks", 2012; Shorten & Khoshgoftaar, "A survey on Image Data Augmentation", 2019),
    done with kornia (Riba et al., 2020) on tensor batches already on the device, each technique with its own
    probability. Training only: validation / test / predict batches are untouched. Random parameters come from
    ``(seed, global_step, micro-batch, rank)``: reproducible, exact on resume, different per DDP rank.

    Args:
        hflip_p: probability of a horizontal flip per image.
        vflip_p: probability of a vertical flip per image.
        rotation_degrees: maximum rotation angle (uniform in ``[-deg, deg]``); 0 disables rotation.
        rotation_p: probability of a rotation per image.
        brightness, contrast, saturation, hue: ColorJitter magnitudes (kornia semantics; 0 disables each).
        color_p: probability of the colour jitter per image.
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).
        input_key: where the images are in a dict/tuple batch (default: element 0 or a known key such as ``"x"``).

    Example::

        aug = ImageAugmentation(hflip_p=0.5, rotation_degrees=10, brightness=0.2)
        trainer = L.Trainer(callbacks=[aug], max_epochs=10)
        trainer.fit(DigitsCNN(), datamodule=DigitsDataModule())

    Limits: needs ``[B, C, H, W]`` float images (``pip install 'lightning_techniques[augment]'`` for kornia);
    kornia's colour jitter clamps to ``[0, 1]``, so put it before a normalisation callback in ``callbacks``.
    Horizontal flips change the meaning of some classes (digits, text): choose the probabilities for your data.
    """

    takes_over: frozenset[str] = frozenset({"batch_transform"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        hflip_p: float = 0.5,
        vflip_p: float = 0.0,
        rotation_degrees: float = 0.0,
        rotation_p: float = 0.5,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        color_p: float = 0.5,
        seed: int | None = None,
        input_key: str | int | None = None,
    ) -> None:
        for name, value in (("hflip_p", hflip_p), ("vflip_p", vflip_p), ("rotation_p", rotation_p),
                            ("color_p", color_p)):
            check_probability(name, value)
        check_number("rotation_degrees", rotation_degrees, low=0.0, high=180.0)
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            check_non_negative(name, value)
        check_number("hue", hue, low=0.0, high=0.5)
        self.hflip_p = hflip_p
        self.vflip_p = vflip_p
        self.rotation_degrees = rotation_degrees
        self.rotation_p = rotation_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.color_p = color_p
        self.seed = seed
        self.input_key = input_key
        self.augmentation = build_augmentation(hflip_p, vflip_p, rotation_degrees, rotation_p, brightness, contrast,
                                               saturation, hue, color_p)
        if len(self.augmentation) == 0:
            raise ValueError("ImageAugmentation: every technique is disabled; set hflip_p, vflip_p, rotation_degrees "
                             "or a colour magnitude (brightness, contrast, saturation, hue) above 0.")
        self._seeder: StepSeeder | None = None
        self._trainer: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        self._seeder = StepSeeder(default_seed(self.seed), salt=0x1A6)
        self.install_transform(trainer, pl_module, stages=("train",))

    def _transform(self, batch: Any, stage: str) -> Any:
        assert self._seeder is not None
        x = get_inputs(batch, self.input_key)
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"ImageAugmentation needs a float [B, C, H, W] image batch, got {x.dtype} of shape "
                             f"{tuple(x.shape)}.")
        self.augmentation.to(x.device)
        out = augment_images(self.augmentation, x, self._seeder.next_seed(self._trainer))
        return set_inputs(batch, out.to(x.dtype), self.input_key)
