"""AdaptiveGradientClipping (AGC) and AutoClip: formula, effect on a stock Trainer, resume, bad input, YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques.demo import DigitsCNN, DigitsDataModule
from lightning_techniques.optim.clipping import (
    AdaptiveGradientClipping,
    AutoClip,
    SlidingWindowPercentile,
    adaptive_clip_grad_,
    autoclip_threshold,
    clip_grad_norm_to_,
    total_grad_norm,
    unitwise_norm,
)
from lightning_techniques.testing import assert_exact_resume, build_from_yaml

ROOT = Path(__file__).resolve().parents[1]


class GradProbe(Callback):
    """Records the gradients as the optimizer will see them (runs after the clipping callback)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.weights.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


# ---------------------------------------------------------------- core
def test_unitwise_norm_per_output_unit() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert torch.equal(unitwise_norm(w), torch.tensor([[5.0], [1.0]]))
    assert unitwise_norm(torch.tensor([3.0, 4.0])).item() == 5.0
    conv = torch.ones(2, 3, 2, 2)
    assert torch.allclose(unitwise_norm(conv).flatten(), torch.full((2,), 12.0**0.5))


def test_agc_matches_hand_computed_case() -> None:
    w = nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))  # unit norms 5 and 0 (-> eps)
    w.grad = torch.tensor([[0.3, 0.4], [0.06, 0.08]])  # unit grad norms 0.5 and 0.1
    b = nn.Parameter(torch.tensor([1.0, 0.0]))  # norm 1
    b.grad = torch.tensor([0.001, 0.0])  # ratio 0.001: not clipped
    clipped, total = adaptive_clip_grad_([w, b], clipping=0.05, eps=1e-3)
    # unit 0: max_norm 0.25 < 0.5 -> scaled by 0.5; unit 1: max_norm 5e-5 < 0.1 -> scaled by 5e-4
    assert (clipped, total) == (2, 3)
    expected = torch.tensor([[0.15, 0.2], [0.06 * 5e-4, 0.08 * 5e-4]])
    assert torch.allclose(w.grad, expected, rtol=1e-5)
    assert torch.equal(b.grad, torch.tensor([0.001, 0.0]))


def test_autoclip_threshold_matches_numpy_percentile() -> None:
    history = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for p in (0.0, 10.0, 37.5, 50.0, 100.0):
        assert autoclip_threshold(history, p) == pytest.approx(np.percentile(history, p), rel=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        autoclip_threshold([], 10)


def test_clip_grad_norm_to_matches_torch() -> None:
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
    a.grad, b.grad = torch.randn(4, 3), torch.randn(3)
    ref = [a.grad.clone(), b.grad.clone()]
    ra, rb = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    ra.grad, rb.grad = ref
    assert clip_grad_norm_to_([a, b], 0.5)
    torch.nn.utils.clip_grad_norm_([ra, rb], 0.5)
    assert torch.allclose(a.grad, ra.grad) and torch.allclose(b.grad, rb.grad)
    assert total_grad_norm([a, b]) == pytest.approx(0.5, rel=1e-5)
    assert not clip_grad_norm_to_([a, b], 10.0)


# ---------------------------------------------------------------- integration
def _fit(callbacks: list[Callback], trainer_kwargs: dict, steps: int = 6, **extra: Any) -> DigitsCNN:
    L.seed_everything(0)
    model = DigitsCNN(channels=8)
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs, **extra)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return model


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_agc_bounds_every_unit_ratio(precision: str, trainer_kwargs: dict) -> None:
    agc, probe = AdaptiveGradientClipping(clipping=0.01, exclude=["head.*"]), GradProbe()
    _fit([agc, probe], trainer_kwargs, precision=precision)
    assert agc.steps == 6 and agc.clipped_steps == 6 and agc.clip_fraction == 1.0
    assert agc.last_norm_after < agc.last_norm_before
    for grads, weights in zip(probe.grads, probe.weights):
        for name, g in grads.items():
            ratio = unitwise_norm(g) / unitwise_norm(weights[name]).clamp_min(1e-3)
            if name.startswith("head."):
                continue
            assert float(ratio.max()) <= 0.01 * (1 + 1e-4), name
        # the excluded head keeps its raw gradient: its ratio is far above the threshold
        assert float((unitwise_norm(grads["head.weight"]) / unitwise_norm(weights["head.weight"])).max()) > 0.01


def test_agc_with_a_loose_threshold_changes_nothing(trainer_kwargs: dict) -> None:
    baseline = _fit([], trainer_kwargs)
    agc = AdaptiveGradientClipping(clipping=1e6)
    clipped = _fit([agc], trainer_kwargs)
    assert agc.clipped_steps == 0
    for (n, a), b in zip(baseline.state_dict().items(), clipped.state_dict().values()):
        assert torch.equal(a, b), n


def test_norms_and_clip_fraction_are_logged(trainer_kwargs: dict) -> None:
    L.seed_everything(0)
    agc, auto = AdaptiveGradientClipping(clipping=0.01), AutoClip(percentile=50)
    trainer = L.Trainer(max_steps=4, callbacks=[agc, auto], **trainer_kwargs)
    trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
    metrics = trainer.callback_metrics
    assert float(metrics["agc/grad_norm_before"]) == pytest.approx(agc.last_norm_before, rel=1e-6)
    assert float(metrics["agc/grad_norm_after"]) == pytest.approx(agc.last_norm_after, rel=1e-6)
    assert float(metrics["agc/clip_fraction"]) == 1.0
    assert float(metrics["autoclip/threshold"]) == pytest.approx(auto.last_threshold, rel=1e-6)
    assert float(metrics["autoclip/clip_fraction"]) == pytest.approx(auto.clip_fraction)


def test_autoclip_clips_at_the_running_percentile(trainer_kwargs: dict) -> None:
    auto, probe = AutoClip(percentile=25), GradProbe()
    _fit([auto, probe], trainer_kwargs, steps=8)
    assert len(auto.history) == 8 and auto.steps == 8
    for i, grads in enumerate(probe.grads):
        threshold = np.percentile(auto.history[: i + 1], 25)
        after = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))
        assert after <= threshold * (1 + 1e-4)
        if auto.history[i] > threshold * (1 + 1e-4):
            assert after == pytest.approx(threshold, rel=1e-4)
    assert 0 < auto.clip_fraction < 1


def _norms(probe: GradProbe) -> list[float]:
    return [float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))) for grads in probe.grads]


def test_autoclip_history_size_and_warmup(trainer_kwargs: dict) -> None:
    raw_probe, auto, probe = GradProbe(), AutoClip(percentile=0, history_size=3, warmup_steps=2), GradProbe()
    _fit([raw_probe, auto, probe], trainer_kwargs, steps=5)
    raw, after = _norms(raw_probe), _norms(probe)
    assert auto.history == pytest.approx(raw[-3:], rel=1e-6)
    assert after[:2] == pytest.approx(raw[:2], rel=1e-6)  # warm-up: recorded, not clipped
    for i in range(2, 5):
        threshold = min(raw[max(0, i - 2): i + 1])  # percentile 0 of the last 3 norms
        assert after[i] == pytest.approx(min(raw[i], threshold), rel=1e-4)


def test_autoclip_exact_resume(tmp_path: Path) -> None:
    straight = assert_exact_resume(
        lambda: DigitsCNN(channels=8),
        lambda: DigitsDataModule(batch_size=32),
        lambda: [AutoClip(percentile=20), AdaptiveGradientClipping(clipping=0.02)],
        tmp_path,
        total_steps=6,
        split_step=3,
    )
    assert len(straight["callbacks"][0].history) == 6


def _max_unit_ratio(probe: GradProbe) -> float:
    return max(
        float((unitwise_norm(g.float()) / unitwise_norm(w[n].float()).clamp_min(1e-3)).max())
        for grads, w in zip(probe.grads, probe.weights)
        for n, g in grads.items()
    )


def test_agc_acts_on_unscaled_gradients_under_16_mixed_cpu(trainer_kwargs: dict) -> None:
    # fp16 autocast + GradScaler run on CPU too (torch's CPU GradScaler): the clipped ratio must be exactly the
    # threshold on the *unscaled* gradients; clipping the scaled ones (x 65536) would leave ratios ~ 0.01 / 65536
    from lightning_techniques.optim.precision import SmartMixedPrecision

    agc, probe = AdaptiveGradientClipping(clipping=0.01), GradProbe()
    _fit([agc, probe], trainer_kwargs, plugins=[SmartMixedPrecision("16-mixed", device="cpu")])
    assert agc.clipped_steps == 6
    assert _max_unit_ratio(probe) == pytest.approx(0.01, rel=1e-3)


@pytest.mark.gpu
def test_agc_acts_on_unscaled_gradients_under_16_mixed_gpu(trainer_kwargs: dict) -> None:
    agc, probe = AdaptiveGradientClipping(clipping=0.01), GradProbe()
    kwargs = dict(trainer_kwargs, accelerator="gpu")
    _fit([agc, probe], kwargs, precision="16-mixed")
    assert _max_unit_ratio(probe) == pytest.approx(0.01, rel=1e-3)


# ---------------------------------------------------------------- bad input / YAML
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: AdaptiveGradientClipping(clipping=0), ValueError, "clipping"),
        (lambda: AdaptiveGradientClipping(eps=-1.0), ValueError, "eps"),
        (lambda: AdaptiveGradientClipping(exclude="head"), TypeError, "exclude"),
        (lambda: AutoClip(percentile=120), ValueError, "percentile"),
        (lambda: AutoClip(history_size=0), ValueError, "history_size"),
        (lambda: AutoClip(warmup_steps=-1), ValueError, "warmup_steps"),
    ],
)
def test_bad_arguments(make: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_agc_excluding_everything_fails_in_setup(trainer_kwargs: dict) -> None:
    with pytest.raises(ValueError, match="leaves no parameter"):
        _fit([AdaptiveGradientClipping(exclude=["*"])], trainer_kwargs, steps=1)


@pytest.mark.parametrize("name", ["AdaptiveGradientClipping", "AutoClip"])
def test_builds_from_yaml(name: str, tmp_path: Path) -> None:
    cli = build_from_yaml(ROOT / f"configs/callbacks/{name}.yaml", extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    assert any(type(cb).__name__ == name for cb in cli.trainer.callbacks)


# ---------------------------------------------------------------- logging switch, bounded state, fused norms
def _reference_agc_(params: list[torch.Tensor], clipping: float, eps: float) -> tuple[int, int]:
    """The former per-tensor implementation (one host sync per tensor), kept as the numerical reference."""
    clipped = total = 0
    for p in params:
        grad = p.grad
        max_norm = unitwise_norm(p.detach().float()).clamp_min(eps) * clipping
        grad_norm = unitwise_norm(grad.float())
        trigger = grad_norm > max_norm
        scale = torch.where(trigger, max_norm / grad_norm.clamp_min(1e-6), torch.ones_like(grad_norm))
        grad.mul_(scale.to(grad.dtype))
        clipped += int(trigger.sum())
        total += trigger.numel()
    return clipped, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_agc_matches_the_per_tensor_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    shapes = [(6, 3, 3, 3), (6,), (10, 24), (10,), ()]
    params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape) * 0.1).to(dtype)
    params[3].grad = None  # parameters without a gradient are ignored
    reference = [nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = None if p.grad is None else p.grad.clone()
    expected = _reference_agc_([r for r in reference if r.grad is not None], 0.1, 1e-3)
    assert adaptive_clip_grad_(params, 0.1, 1e-3) == expected
    assert 0 < expected[0] < expected[1]
    for r, p in zip(reference, params):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)


class _Params(nn.Module):
    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> None:
        super().__init__()
        self.ps = nn.ParameterList([nn.Parameter(torch.randn(s).to(dtype)) for s in shapes])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the preallocated plan, and the general path
def test_agc_callback_matches_the_per_tensor_reference_step_after_step(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = _Params([(6, 3, 3, 3), (6,), (10, 24), (10,), ()], dtype)
    agc = AdaptiveGradientClipping(clipping=0.1, log=False)
    for step in range(3):  # the plan's buffer sets alternate: every step must still be exact
        grads = [(torch.randn(p.shape) * 0.1 * (step + 1)).to(dtype) for p in module.ps]
        reference = [nn.Parameter(p.detach().clone()) for p in module.ps]
        for r, p, g in zip(reference, module.ps, grads):
            r.grad, p.grad = g.clone(), g.clone()
        clipped, total = _reference_agc_(reference, 0.1, 1e-3)
        agc.on_before_optimizer_step(None, module, None)
        for r, p in zip(reference, module.ps):
            torch.testing.assert_close(p.grad, r.grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=0)
        assert agc.unit_clip_fraction == pytest.approx(clipped / total)
        assert agc.last_norm_after == pytest.approx(total_grad_norm(module.ps), rel=1e-4 if dtype == torch.float32
                                                    else 1e-2)
    assert agc.steps == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_agc_non_finite_steps_change_nothing_and_keep_the_last_steps_values(bad: float) -> None:
    torch.manual_seed(0)
    module = _Params([(4, 8), (4,)], torch.float32)
    agc = AdaptiveGradientClipping(clipping=0.01, log=False)
    for p in module.ps:
        p.grad = torch.randn(p.shape)
    reference = [nn.Parameter(p.detach().clone()) for p in module.ps]
    for r, p in zip(reference, module.ps):
        r.grad = p.grad.clone()
    before = total_grad_norm(module.ps)
    clipped, total = _reference_agc_(reference, 0.01, 1e-3)
    agc.on_before_optimizer_step(None, module, None)  # its norm after and unit fraction are read only at the end
    after, fraction = total_grad_norm(module.ps), clipped / total
    assert 0 < fraction and after < before
    for _ in range(3):  # more than the plan's two buffer sets
        for p in module.ps:
            p.grad = torch.randn(p.shape)
        module.ps[0].grad[0, 0] = bad
        given = [p.grad.clone() for p in module.ps]
        agc.on_before_optimizer_step(None, module, None)
        for p, g in zip(module.ps, given):
            torch.testing.assert_close(p.grad, g, equal_nan=True)  # left alone
    assert agc.steps == 1
    assert agc.last_norm_after == pytest.approx(after, rel=1e-5)
    assert agc.unit_clip_fraction == pytest.approx(fraction)
    assert agc.last_norm_before == pytest.approx(before, rel=1e-5)


def test_agc_units_with_a_zero_gradient_are_left_at_zero_and_not_counted() -> None:
    module = _Params([(3, 4), (3,)], torch.float32)
    agc = AdaptiveGradientClipping(clipping=0.01, log=False)
    module.ps[0].grad = torch.zeros(3, 4)
    module.ps[0].grad[1] = 100.0  # one unit far above the threshold, two with a zero gradient
    module.ps[1].grad = torch.zeros(3)
    agc.on_before_optimizer_step(None, module, None)
    assert agc.steps == 1 and agc.clipped_steps == 1
    assert torch.count_nonzero(module.ps[0].grad[[0, 2]]) == 0 and torch.count_nonzero(module.ps[1].grad) == 0
    assert torch.isfinite(module.ps[0].grad).all()
    assert agc.unit_clip_fraction == pytest.approx(1 / 4)  # 3 rows + the bias vector
    for p in module.ps:
        p.grad = torch.zeros_like(p)
    agc.on_before_optimizer_step(None, module, None)  # all zero: nothing to clip, a finite step
    assert agc.steps == 2 and agc.clipped_steps == 1 and agc.last_norm_before == 0.0 == agc.last_norm_after


def test_total_grad_norm_matches_torch_in_mixed_dtypes() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(3).half()), nn.Parameter(torch.randn(2))]
    params[0].grad, params[1].grad = torch.randn(5, 4) * 1e3, (torch.randn(3) * 300).half()  # fp16 sum of squares
    expected = float(torch.linalg.vector_norm(torch.cat([p.grad.float().flatten() for p in params[:2]])))
    assert total_grad_norm(params) == pytest.approx(expected, rel=1e-6)  # overflows fp16; computed in fp32
    assert total_grad_norm([params[2]]) == 0.0


def test_sliding_window_percentile_matches_numpy_on_the_window() -> None:
    rng = np.random.default_rng(0)
    stream = np.round(rng.lognormal(size=400), 2)  # rounded: many duplicate values
    window = SlidingWindowPercentile(37)
    for i, value in enumerate(stream):
        window.append(float(value))
        last = stream[max(0, i - 36): i + 1]
        assert window.values == pytest.approx(list(last))
        for p in (0.0, 10.0, 50.0, 99.0, 100.0):
            assert window.percentile(p) == pytest.approx(np.percentile(last, p), rel=1e-12)
    assert len(window) == 37


def _drive_autoclip(auto: AutoClip, steps: int, seed: int = 0) -> list[float]:
    """Run AutoClip's optimizer-step hook on a plain module (no Trainer) with random gradients."""
    torch.manual_seed(seed)
    model = nn.Linear(8, 4)
    norms = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape) * float(torch.rand(()) * 5)
        norms.append(total_grad_norm(model.parameters()))
        auto.on_before_optimizer_step(None, model, None)
    return norms


def _state_bytes(state: dict) -> int:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return len(buffer.getvalue())


def test_autoclip_state_and_per_step_work_stay_bounded() -> None:
    auto = AutoClip(percentile=10, history_size=50)
    norms = _drive_autoclip(auto, 120)
    size_at_120 = _state_bytes(auto.state_dict())
    assert auto.history == pytest.approx(norms[-50:], rel=1e-6)
    assert len(auto._window._sorted) == 50  # the per-step work is over the window, not the run
    assert auto.last_threshold == pytest.approx(np.percentile(norms[-50:], 10), rel=1e-6)
    _drive_autoclip(auto, 200, seed=1)
    assert auto.steps == 320 and len(auto.history) == 50 and len(auto._window._sorted) == 50
    assert _state_bytes(auto.state_dict()) == size_at_120  # does not grow past the bound
    # resume: a fresh instance loaded from the state clips exactly as the original from then on
    clone = AutoClip(percentile=10, history_size=50)
    clone.load_state_dict(auto.state_dict())
    assert clone.history == auto.history and clone._window._sorted == auto._window._sorted
    _drive_autoclip(auto, 30, seed=2)
    _drive_autoclip(clone, 30, seed=2)
    assert clone.history == auto.history and clone.last_threshold == auto.last_threshold


def test_autoclip_default_window_is_bounded() -> None:
    assert AutoClip().history_size == 10_000
    assert AutoClip(history_size=None)._window.size is None  # the paper's unbounded history stays available


@pytest.mark.parametrize("make", [lambda log: AdaptiveGradientClipping(clipping=0.01, log=log),
                                  lambda log: AutoClip(percentile=50, log=log)], ids=["agc", "autoclip"])
def test_log_false_logs_nothing_and_log_true_logs(make: Any, trainer_kwargs: dict) -> None:
    # regression: the switch was kept in ``self.log``, which Lightning overwrites with the module's log before setup
    for log in (False, True):
        callback = make(log)
        L.seed_everything(0)
        trainer = L.Trainer(max_steps=3, callbacks=[callback], log_every_n_steps=1, **trainer_kwargs)
        trainer.fit(DigitsCNN(channels=8), datamodule=DigitsDataModule(batch_size=32))
        keys = {k for k in trainer.callback_metrics if k.startswith(f"{callback._prefix}/")}
        assert callback.steps == 3
        assert bool(keys) is log, keys


def test_log_argument_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="log must be True or False"):
        AutoClip(log="no")  # type: ignore[arg-type]


def test_a_new_module_is_never_given_a_freed_modules_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    # regression: the parameter selection was cached by id(pl_module); a new module that reused a freed module's id
    # (CPython hands freed memory to the next object of the same size) got the old module's parameters, so AutoClip
    # measured and clipped tensors of a module that no longer trained. Every module gets the same id() here, which is
    # what an id reuse looks like to such a cache.
    import lightning_techniques.optim.clipping as clipping

    monkeypatch.setattr(clipping, "id", lambda obj: 1, raising=False)
    auto = AutoClip(percentile=50, history_size=None)
    first = nn.Linear(8, 4)
    for p in first.parameters():
        p.grad = torch.ones_like(p)
    auto.on_before_optimizer_step(None, first, None)
    second = nn.Linear(8, 4)
    for p in second.parameters():
        p.grad = torch.full_like(p, 3.0)
    expected = total_grad_norm(second.parameters())  # before AutoClip clips it (6.0 would be the first module's)
    auto.on_before_optimizer_step(None, second, None)
    assert auto.history[-1] == pytest.approx(expected, rel=1e-6)
