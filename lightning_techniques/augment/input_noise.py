"""Input noise injection during training (Gaussian, uniform or salt-and-pepper) with a schedule for its scale."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from lightning_techniques._internal.batch import get_inputs, set_inputs
from lightning_techniques._internal.batch_transforms import BatchTransformCallback
from lightning_techniques._internal.lean_hooks import needed_while
from lightning_techniques._internal.schedule import interpolate, progress
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_positive
from lightning_techniques.augment._seeding import StepSeeder, default_seed, generator

NoiseKind = Literal["gaussian", "uniform", "salt_and_pepper"]
NoiseSchedule = Literal["constant", "linear", "cosine", "exponential"]
KINDS = ("gaussian", "uniform", "salt_and_pepper")
SCHEDULES = ("constant", "linear", "cosine", "exponential")

# ---------------------------------------------------------------------------------------------------------------- core


def scheduled_scale(step: int, total_steps: int, start: float, end: float, schedule: str = "constant") -> float:
    """The noise scale at optimizer step ``step`` of a schedule going from ``start`` (step 0) to ``end``
    (step ``total_steps`` and after).

    ``"constant"``: ``start``; ``"linear"``: ``start + (end - start) t``; ``"cosine"``:
    ``end + (start - end) (1 + cos(pi t)) / 2``; ``"exponential"``: ``start (end / start)^t`` (both > 0), with
    ``t = min(step / total_steps, 1)``.
    """
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "constant":
        return float(start)
    check_positive("total_steps", total_steps, integer=True)
    if schedule == "exponential" and (start <= 0 or end <= 0):
        raise ValueError(f"the exponential schedule needs scale > 0 and final_scale > 0, got {start} and {end}.")
    return float(interpolate(start, end, progress(step, total_steps), schedule))


def add_noise(
    x: torch.Tensor,
    scale: float,
    kind: str = "gaussian",
    generator: torch.Generator | None = None,
    salt_value: float = 1.0,
    pepper_value: float = 0.0,
) -> torch.Tensor:
    """A noisy copy of ``x``.

    ``"gaussian"``: ``x + scale * N(0, 1)``; ``"uniform"``: ``x + U(-scale, scale)``; ``"salt_and_pepper"``: each
    element is replaced with probability ``scale`` by ``salt_value`` or ``pepper_value`` (half each).
    """
    check_choice("kind", kind, KINDS)
    if not x.is_floating_point():
        raise TypeError(f"input noise needs a floating-point input, got {x.dtype}.")
    if scale == 0:
        return x.clone()
    if kind == "gaussian":
        return x + scale * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if kind == "uniform":
        return x + scale * (2 * torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) - 1)
    if not 0 <= scale <= 1:
        raise ValueError(f"salt-and-pepper noise needs a corruption probability in [0, 1], got {scale}.")
    corrupt = torch.rand(x.shape, generator=generator, device=x.device) < scale
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    values = torch.where(salt, torch.full_like(x, salt_value), torch.full_like(x, pepper_value))
    return torch.where(corrupt, values, x)


# ------------------------------------------------------------------------------------------------------------ adapter


class InputNoise(BatchTransformCallback):
    """Add random noise to the model's inputs in training only, with a scheduled scale.

    Training with input noise (Sietsma & Dow, "Creating artificial neural networks that generalize", 1991; Bishop,
    "Training with noise is equivalent to Tikhonov regularization", 1995) regularises the model. The noise is added
    to the batch on the device before ``training_step`` (validation / test / predict see the clean inputs). Its
    scale follows ``schedule`` from ``scale`` at step 0 to ``final_scale`` at ``schedule_steps`` (default: the
    run's total number of optimizer steps) and is logged as ``input_noise/scale`` (at the Trainer's
    ``log_every_n_steps`` cadence and on the run's last step). Draws come from a generator
    seeded with ``(seed, global_step, micro-batch, rank)``: reproducible, exact on resume, different per DDP rank.

    Args:
        kind: ``"gaussian"`` (``x + scale * N(0, 1)``), ``"uniform"`` (``x + U(-scale, scale)``) or
            ``"salt_and_pepper"`` (each element set to ``salt_value`` / ``pepper_value`` with probability ``scale``).
        scale: noise scale at the start (standard deviation, half-width, or corruption probability).
        final_scale: scale at the end of the schedule (default: ``scale``).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"exponential"``.
        schedule_steps: optimizer steps the schedule spans (default: ``trainer.estimated_stepping_batches``).
        salt_value, pepper_value: replacement values of salt-and-pepper noise.
        clip: optional ``[low, high]`` to clamp the noisy input to (e.g. ``[0, 1]`` for images).
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).
        input_key: where the input is in a dict/tuple batch (default: element 0 or a known key such as ``"x"``).
        log: log the scale with ``pl_module.log`` (``False``: log nothing).

    Example::

        noise = InputNoise(kind="gaussian", scale=0.3, final_scale=0.0, schedule="cosine")
        trainer = L.Trainer(callbacks=[noise], max_steps=1000)

    Limits: the input must be a floating-point tensor; place it after a normalisation callback in ``callbacks``
    when the scale is meant in normalised units.
    """

    takes_over: frozenset[str] = frozenset({"batch_transform"})  # see lightning_techniques/_internal/conflicts.py
    conflicts_with: tuple[str, ...] = ()

    def __init__(
        self,
        kind: NoiseKind = "gaussian",
        scale: float = 0.1,
        final_scale: float | None = None,
        schedule: NoiseSchedule = "constant",
        schedule_steps: int | None = None,
        salt_value: float = 1.0,
        pepper_value: float = 0.0,
        clip: list[float] | None = None,
        seed: int | None = None,
        input_key: str | int | None = None,
        log: bool = True,
    ) -> None:
        check_choice("kind", kind, KINDS)
        check_choice("schedule", schedule, SCHEDULES)
        check_non_negative("scale", scale)
        if final_scale is not None:
            check_non_negative("final_scale", final_scale)
        if schedule_steps is not None:
            check_positive("schedule_steps", schedule_steps, integer=True)
        if kind == "salt_and_pepper":
            for name, value in (("scale", scale), ("final_scale", final_scale)):
                if value is not None and value > 1:
                    raise ValueError(f"{name}={value} is a corruption probability for salt-and-pepper noise; use [0, 1].")
        if schedule == "exponential" and (scale <= 0 or (final_scale is not None and final_scale <= 0)):
            raise ValueError("schedule='exponential' needs scale > 0 and final_scale > 0.")
        if clip is not None and (not isinstance(clip, (list, tuple)) or len(clip) != 2 or not clip[0] < clip[1]):
            raise ValueError(f"clip must be None or a pair [low, high] with low < high, got {clip!r}.")
        self.kind = kind
        self.scale = float(scale)
        self.final_scale = float(scale if final_scale is None else final_scale)
        self.schedule = schedule
        self.schedule_steps = schedule_steps
        self.salt_value = float(salt_value)
        self.pepper_value = float(pepper_value)
        self.clip = None if clip is None else [float(clip[0]), float(clip[1])]
        self.seed = seed
        self.input_key = input_key
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.current_scale = self.scale
        self._seeder: StepSeeder | None = None
        self._total = 1
        self._trainer: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        self._seeder = StepSeeder(default_seed(self.seed), salt=0x1A7)
        self.install_transform(trainer, pl_module, stages=("train",))

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule_steps is not None:
            self._total = self.schedule_steps
        elif self.schedule != "constant":
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                raise ValueError("InputNoise: the run's length is unknown (max_steps=-1 and an infinite loader); "
                                 "pass schedule_steps=...")
            self._total = int(total)

    def scale_at(self, step: int) -> float:
        """The noise scale at optimizer step ``step``."""
        return scheduled_scale(step, self._total, self.scale, self.final_scale, self.schedule)

    def _transform(self, batch: Any, stage: str) -> Any:
        trainer = self._trainer
        assert self._seeder is not None
        x = get_inputs(batch, self.input_key)
        if not x.is_floating_point():
            raise TypeError(f"InputNoise needs a floating-point input tensor, got {x.dtype}.")
        self.current_scale = self.scale_at(trainer.global_step)
        gen = generator(self._seeder.next_seed(trainer), x.device)
        noisy = add_noise(x, self.current_scale, self.kind, gen, self.salt_value, self.pepper_value)
        if self.clip is not None:
            noisy = noisy.clamp(self.clip[0], self.clip[1])
        return set_inputs(batch, noisy, self.input_key)

    @needed_while(lambda self: self._log_enabled)
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._log_enabled:
            log_step_metrics(pl_module, {"input_noise/scale": self.current_scale})

    def state_dict(self) -> dict[str, Any]:
        return {"current_scale": self.current_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_scale = float(state_dict.get("current_scale", self.scale))
