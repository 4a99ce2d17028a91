"""Noise and dropout on the outputs of chosen layers during training, through forward hooks installed for the run.

Adapters :class:`ActivationNoise` (Gaussian, additive or multiplicative, scheduled scale) and
:class:`ActivationDropout` (dropout inserted after chosen layers); core :func:`dropout_mask`. The Gaussian draw is
the input-noise core (:func:`~lightning_techniques.augment.input_noise.add_noise`), the schedule is the one schedule
core (through :func:`~lightning_techniques.augment.input_noise.scheduled_scale`) and the seeding is the augmentation
area's per-micro-batch seeder: a run is reproducible, a resumed run draws exactly what the straight run drew, DDP
ranks draw differently.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from lightning_techniques._internal.conflicts import check_conflicts
from lightning_techniques._internal.lean_hooks import LeanHooks
from lightning_techniques._internal.patching import undo_at_run_end
from lightning_techniques._internal.step_logging import check_log_flag, log_step_metrics
from lightning_techniques._internal.validation import check_choice, check_non_negative, check_number, check_positive
from lightning_techniques.augment._seeding import StepSeeder, default_seed, generator
from lightning_techniques.augment.input_noise import SCHEDULES, NoiseSchedule, add_noise, scheduled_scale
from lightning_techniques.finetune._trainable import check_targets, resolve_targets

ActivationNoiseMode = Literal["additive", "multiplicative"]
MODES = ("additive", "multiplicative")

# ---------------------------------------------------------------------------------------------------------------- core


def activation_noise(x: torch.Tensor, std: float, mode: str = "additive",
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + std * eps`` (``"additive"``) or ``x * (1 + std * eps)`` (``"multiplicative"``, Gaussian dropout;
    Srivastava et al. 2014), ``eps ~ N(0, 1)`` from ``generator``. Differentiable in ``x``."""
    check_choice("mode", mode, MODES)
    if mode == "additive":
        return add_noise(x, std, "gaussian", generator)
    return x * add_noise(torch.ones_like(x), std, "gaussian", generator)


def dropout_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverted-dropout mask: each element ``0`` with probability ``p``, else ``1 / (1 - p)`` (Srivastava et al.
    2014), drawn from ``generator``."""
    check_number("p", p, low=0.0, high=1.0, high_inclusive=False)
    keep = torch.rand(shape, generator=generator, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


# ------------------------------------------------------------------------------------------------------------ adapters


class _ActivationHooks(LeanHooks, Callback):
    """Forward hooks on the layers ``targets`` select, active only for training batches of the layers in train mode;
    a generator reseeded per training micro-batch (``(seed, salt, step, micro-batch, rank)``)."""

    takes_over: frozenset[str] = frozenset()
    conflicts_with: tuple[str, ...] = ()
    _salt = 0
    _name = "activation hooks"

    def __init__(self, targets: list[str], seed: int | None) -> None:
        self.targets = check_targets("targets", targets)
        if seed is not None:
            check_number("seed", seed, low=0, integer=True)
        self.seed = seed
        self.hooked_layers: list[str] = []
        self._handles: list[Any] = []
        self._seeder: StepSeeder | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._batch_seed: int | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        check_conflicts(trainer, self)
        paths = resolve_targets(pl_module, self.targets, "targets")
        self._remove()
        self.hooked_layers = paths
        self._seeder = StepSeeder(default_seed(self.seed), salt=self._salt)
        for path in paths:
            self._handles.append(pl_module.get_submodule(path).register_forward_hook(self._hook))
        undo_at_run_end(trainer, self._remove)

    def _generator(self, device: torch.device) -> torch.Generator:
        """The device's generator, seeded with this batch's seed at its first use in the batch."""
        gen = self._generators.get(device)
        if gen is None:
            assert self._batch_seed is not None
            gen = self._generators[device] = generator(self._batch_seed, device)
        return gen

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self._batch_seed is None or not module.training:
            return None  # validation / test / predict, or the layer in eval mode: untouched
        return apply_to_collection(output, torch.Tensor, self._apply_if_float)

    def _apply_if_float(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self._generator(x.device)) if x.is_floating_point() else x

    def _apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        assert self._seeder is not None
        self._batch_seed = self._seeder.next_seed(trainer)
        self._generators = {}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batch_seed = None

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._generators, self._batch_seed = [], {}, None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._remove()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._remove()


class ActivationNoise(_ActivationHooks):
    """Add Gaussian noise to the outputs of chosen layers in training only, with a scheduled scale.

    Noise injected into hidden activations regularises a network (Poole, Sohl-Dickstein & Ganguli, "Analyzing noise
    in autoencoders and deep networks", 2014; multiplicative Gaussian noise is Srivastava et al. 2014's Gaussian
    dropout). A forward hook on each chosen layer (installed in ``setup``, removed at teardown and on an exception)
    replaces its output by ``out + std * eps`` (``"additive"``) or ``out * (1 + std * eps)`` (``"multiplicative"``:
    relative to the activation) for training batches while the layer is in train mode; validation, test, predict
    and the layer in eval mode see clean outputs. ``std`` follows ``schedule`` from ``std`` at step 0 to
    ``final_std`` at ``schedule_steps`` (the one schedule core) and is logged as ``activation_noise/std``. Draws come
    from a generator seeded with ``(seed, global_step, micro-batch, rank)`` (as :class:`InputNoise`): reproducible,
    exact on resume, different per DDP rank.

    Args:
        targets: layers whose outputs get noise - paths (``"features.2"``), regular expressions matched in full, or
            layer types (``"ReLU"``, ``"torch.nn.Linear"``).
        std: noise scale at the start (absolute standard deviation, or relative for ``"multiplicative"``).
        final_std: scale at the end of the schedule (default: ``std``).
        schedule: ``"constant"``, ``"linear"``, ``"cosine"`` or ``"exponential"``.
        schedule_steps: optimizer steps the schedule spans (default: ``trainer.estimated_stepping_batches``).
        mode: ``"additive"`` or ``"multiplicative"``.
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).
        log: log the scale at the ``log_every_n_steps`` cadence (``False``: log nothing).

    Example::

        trainer = L.Trainer(callbacks=[ActivationNoise(targets=["features.1"], std=0.1, final_std=0.0,
                                                       schedule="cosine")], max_steps=1000)

    Limits: floating-point tensor outputs only (other outputs pass through); a layer called several times in one
    forward gets fresh noise each call; the layer's output is replaced (a hook returning a new tensor), so in-place
    code that relies on the layer's output object sees the noisy copy. Without ``schedule_steps`` a non-constant
    schedule spans the run's ``estimated_stepping_batches``: a run resumed with another ``max_steps`` follows the
    new length (pass ``schedule_steps`` for a schedule independent of it).
    """

    _salt = 0xAC7
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, targets: list[str], std: float = 0.1, final_std: float | None = None,
                 schedule: NoiseSchedule = "constant", schedule_steps: int | None = None,
                 mode: ActivationNoiseMode = "additive", seed: int | None = None, log: bool = True) -> None:
        super().__init__(targets, seed)
        check_non_negative("std", std)
        if final_std is not None:
            check_non_negative("final_std", final_std)
        check_choice("schedule", schedule, SCHEDULES)
        check_choice("mode", mode, MODES)
        if schedule_steps is not None:
            check_positive("schedule_steps", schedule_steps, integer=True)
        if schedule == "exponential" and (std <= 0 or (final_std is not None and final_std <= 0)):
            raise ValueError("schedule='exponential' needs std > 0 and final_std > 0.")
        self.std = float(std)
        self.final_std = float(std if final_std is None else final_std)
        self.schedule = schedule
        self.schedule_steps = schedule_steps
        self.mode = mode
        self._log_enabled = check_log_flag("log", log)  # not ``self.log``: Lightning assigns that before setup
        self.current_std = self.std
        self._total = 1

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.schedule_steps is not None:
            self._total = self.schedule_steps
        elif self.schedule != "constant":
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total) or total <= 0:
                raise ValueError("ActivationNoise: the run's length is unknown; pass schedule_steps=...")
            self._total = int(total)

    def std_at(self, step: int) -> float:
        """The noise scale at optimizer step ``step``."""
        return scheduled_scale(step, self._total, self.std, self.final_std, self.schedule)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.current_std = self.std_at(trainer.global_step)
        if self._log_enabled:
            log_step_metrics(pl_module, {"activation_noise/std": self.current_std})

    def _apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return activation_noise(x, self.current_std, self.mode, gen)

    def state_dict(self) -> dict[str, Any]:
        return {"current_std": self.current_std}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_std = float(state_dict.get("current_std", self.std))


class ActivationDropout(_ActivationHooks):
    """Insert dropout after chosen layers for training, without editing the model.

    Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov, "Dropout: A Simple Way to Prevent Neural Networks
    from Overfitting", JMLR 2014: each output element of a chosen layer is zeroed with probability ``p`` and the
    rest scaled by ``1 / (1 - p)`` (inverted dropout), in training batches while the layer is in train mode only.
    A forward hook per layer (installed in ``setup``, removed at teardown and on an exception) applies it, so the
    module gains no ``nn.Dropout`` layers and its ``state_dict`` is unchanged. Masks come from a generator seeded
    with ``(seed, global_step, micro-batch, rank)`` - not from the global random state, so the run resumes exactly
    without :class:`RNGStateCheckpoint` - and differ per DDP rank. To schedule ``p``, use
    :class:`DropoutSchedule` on the model's own ``nn.Dropout`` layers.

    Args:
        targets: layers after which dropout is applied - paths, regular expressions matched in full, or layer types.
        p: drop probability in ``[0, 1)``.
        seed: base seed (default: ``PL_GLOBAL_SEED`` from ``seed_everything``, else 0).

    Example::

        trainer = L.Trainer(callbacks=[ActivationDropout(targets=["features.6"], p=0.2)])

    Limits: element-wise dropout only (no channel-wise ``Dropout2d``); floating-point tensor outputs only;
    :class:`MCDropout` does not see these hooks (they are inactive outside training).
    """

    _salt = 0xD20
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, targets: list[str], p: float = 0.1, seed: int | None = None) -> None:
        super().__init__(targets, seed)
        check_number("p", p, low=0.0, high=1.0, high_inclusive=False)
        self.p = float(p)

    def _apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.p == 0:
            return x
        return x * dropout_mask(x.shape, self.p, gen, x.device, x.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # masks are a function of (seed, step, micro-batch, rank)

