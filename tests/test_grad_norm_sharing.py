"""The step's gradient norm shared by NonFiniteGuard, AutoClip and AdaptiveGradientClipping (issue #14): a stack of
them reads the gradients for the total norm once, and the shared value is always the norm of the gradients as they
are when it is used - in either callback order, with another callback changing the gradients in between, after a
skipped step, in another step."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_techniques import AdaptiveGradientClipping, AutoClip, NonFiniteGuard
from lightning_techniques._internal import grad_norms
from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.optim import clipping


def _true_norm(pl_module: Any) -> float:
    grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
    return math.sqrt(sum(float(g.square().sum()) for g in grads))


class NormProbe(Callback):
    """Records the exact total gradient norm at its place in the callback list."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.norms.append(_true_norm(pl_module))


class ScaleGradients(Callback):
    """A user's callback that rescales the gradients in place."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.mul_(self.factor)


class CountNormPasses:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = clipping.host_norms

        def counted(grads: Any) -> list[float]:
            self.calls += 1
            return original(grads)

        monkeypatch.setattr(clipping, "host_norms", counted)


def _fit(callbacks: list[Callback], trainer_kwargs: dict, steps: int = 8) -> DigitsCNN:
    L.seed_everything(0)
    model = DigitsCNN(channels=8)
    L.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs).fit(
        model, datamodule=DigitsDataModule(batch_size=32))
    return model


def test_autoclip_after_the_guard_reuses_its_norm_which_is_the_true_norm(
        trainer_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = CountNormPasses(monkeypatch)
    probe, auto = NormProbe(), AutoClip(percentile=50)
    _fit([NonFiniteGuard(), probe, auto], trainer_kwargs)
    assert passes.calls == 0  # AutoClip never read the gradients for the norm itself
    assert auto.history == pytest.approx(probe.norms, rel=1e-5)
    assert auto.clipped_steps > 0


def test_a_callback_changing_the_gradients_in_between_is_seen(
        trainer_kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    passes = CountNormPasses(monkeypatch)
    probe, auto = NormProbe(), AutoClip(percentile=50)
    _fit([NonFiniteGuard(), ScaleGradients(0.25), probe, auto], trainer_kwargs)
    assert passes.calls == 8  # the gradients changed after the guard: AutoClip computed the norm afresh each step
    assert auto.history == pytest.approx(probe.norms, rel=1e-5)


@pytest.mark.parametrize("order", ["guard-agc-autoclip", "guard-autoclip-agc", "autoclip-agc", "agc-autoclip"])
def test_every_order_sees_the_norm_of_the_gradients_as_they_are(order: str, trainer_kwargs: dict) -> None:
    make = {"guard": NonFiniteGuard, "agc": lambda: AdaptiveGradientClipping(clipping=0.01),
            "autoclip": lambda: AutoClip(percentile=50)}
    callbacks: list[Callback] = []
    probes: dict[str, NormProbe] = {}
    for name in order.split("-"):
        probes[name] = NormProbe()  # the true norm just before each technique
        callbacks += [probes[name], make[name]()]
    after = NormProbe()
    _fit(callbacks + [after], trainer_kwargs)
    auto = next(c for c in callbacks if isinstance(c, AutoClip))
    agc = next(c for c in callbacks if isinstance(c, AdaptiveGradientClipping))
    assert auto.history == pytest.approx(probes["autoclip"].norms, rel=1e-5)
    assert agc.clipped_steps == 8  # AGC at 0.01 changes the gradients every step
    assert agc.last_norm_before == pytest.approx(probes["agc"].norms[-1], rel=1e-5)
    last = auto if order.endswith("autoclip") else agc
    assert last.last_norm_after == pytest.approx(after.norms[-1], rel=1e-5)


def test_guard_skips_a_step_whose_norm_overflows_so_autoclip_never_sees_it(trainer_kwargs: dict) -> None:
    class Huge(Callback):  # finite gradients whose float32 L2 norm overflows on step 3
        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_step == 3:
                for p in pl_module.parameters():
                    p.grad.fill_(1e30)

    guard, auto = NonFiniteGuard(), AutoClip()
    _fit([Huge(), guard, auto], trainer_kwargs)
    assert guard.skipped_steps == [3]
    assert auto.steps == 7 and all(math.isfinite(n) for n in auto.history)


def test_recall_only_for_the_same_step_and_the_same_unchanged_tensors() -> None:
    trainer = SimpleNamespace(global_step=4)
    grads = [torch.ones(3), torch.ones(2, 2)]
    grad_norms.remember(trainer, grads, 2.0)
    assert grad_norms.recall(trainer, grads) == 2.0
    assert grad_norms.recall(trainer, grads[::-1]) == 2.0  # a set: any order
    assert grad_norms.recall(trainer, grads[:1]) is None  # another set
    assert grad_norms.recall(trainer, [grads[0], torch.ones(2, 2)]) is None  # a replaced tensor
    assert grad_norms.recall(SimpleNamespace(global_step=4), grads) is None  # another trainer
    trainer.global_step = 5
    assert grad_norms.recall(trainer, grads) is None  # the next step
    trainer.global_step = 4
    grads[1].view(-1)[0] = 3.0  # in place, through a view
    assert grad_norms.recall(trainer, grads) is None
    calls = []
    grad_norms.remember(trainer, grads, lambda: calls.append(1) or 7.0)
    assert grad_norms.recall(trainer, grads) == 7.0 and grad_norms.recall(trainer, grads) == 7.0
    assert calls == [1]  # computed once, when first asked
    grad_norms.forget()
    assert grad_norms.recall(trainer, grads) is None


def test_nothing_is_held_across_steps() -> None:
    import gc
    import weakref

    trainer = SimpleNamespace(global_step=0)
    grad = torch.ones(1000)
    ref = weakref.ref(grad)
    grad_norms.remember(trainer, [grad], 1.0)
    del grad
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_autoclip_and_guard_on_a_model_in_another_dtype(dtype: torch.dtype, trainer_kwargs: dict) -> None:
    # regression: float64 gradients made AutoClip's fused float32 norm raise
    probe, auto = NormProbe(), AutoClip(percentile=50)
    precision = {torch.float64: "64-true", torch.bfloat16: "bf16-true"}[dtype]
    L.seed_everything(0)
    model = DigitsCNN(channels=8)
    L.Trainer(max_steps=4, callbacks=[NonFiniteGuard(), probe, auto], precision=precision, **trainer_kwargs).fit(
        model, datamodule=DigitsDataModule(batch_size=32))
    assert auto.steps == 4
    assert auto.history == pytest.approx(probe.norms, rel=1e-2 if dtype == torch.bfloat16 else 1e-5)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    reads: list[str] = []
    for name in ("tolist", "item", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name) -> Any:
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("depth", [2, 20])
def test_per_step_work_is_fused_and_reads_the_host_once(depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # deterministic counterpart of benchmarks/overhead.py: torch dispatches and host reads per optimizer step
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(depth)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard, auto, agc = NonFiniteGuard(), AutoClip(percentile=0), AdaptiveGradientClipping(clipping=1e-4)
    trainer = SimpleNamespace(strategy=None, global_step=0, callbacks=[guard, auto, agc])
    for callback in (guard, auto, agc):
        callback.setup(trainer, model, "fit")
    alone = AutoClip(percentile=0)
    alone.setup(SimpleNamespace(strategy=None, global_step=0, callbacks=[alone]), model, "fit")
    reads = _count_host_reads(monkeypatch)
    counts: dict[str, tuple[list[str], list[str]]] = {}
    for step in range(2):  # the second step: AutoClip clips (percentile 0: the smallest norm so far)
        trainer.global_step = step
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (step + 1)
        guard.on_before_backward(trainer, model, torch.tensor(1.0))
        for name, callback in (("guard", guard), ("autoclip", auto), ("agc", agc)):
            del reads[:]
            with _CountOps() as mode:
                callback.on_before_optimizer_step(trainer, model, optimizer)
            counts[name] = (list(mode.ops), list(reads))
        for p in model.parameters():
            p.grad = torch.randn_like(p) * (step + 1)
        del reads[:]
        with _CountOps() as mode:
            alone.on_before_optimizer_step(SimpleNamespace(strategy=None, global_step=step), model, optimizer)
        counts["autoclip alone"] = (list(mode.ops), list(reads))
    matrices = depth  # one weight matrix per layer
    assert counts["guard"] == (["aten._foreach_norm.Scalar", "aten.stack.default"], ["tolist"])
    assert counts["autoclip"] == (["aten._foreach_mul_.Scalar"], [])  # the guard's norm: no pass, no read
    assert counts["autoclip alone"] == (
        ["aten._foreach_norm.Scalar", "aten.stack.default", "aten._foreach_mul_.Scalar"], ["tolist"])
    agc_ops, agc_reads = counts["agc"]
    assert agc_reads == ["__float__"]  # the smallest factor
    assert sum(op.startswith("aten.linalg_vector_norm") for op in agc_ops) == 2 * matrices  # weights and gradients
    assert len(agc_ops) - 2 * matrices <= 10  # the rest does not grow with the model
