"""Adversarial training (FGSM / PGD) and VAT: the cores against hand-computed cases, the adapters' gradients, BatchNorm
statistics, AMP, bad input, and the effect on PGD robust accuracy."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import AdversarialTraining, VirtualAdversarialTraining
from lightning_techniques.demo import DeepMLP, DigitsDataModule
from lightning_techniques.demo.models import ClassifierModule
from lightning_techniques.functional import (
    fgsm,
    input_gradient,
    pgd,
    preserved_batchnorm_stats,
    vat_loss,
    vat_perturbation,
)

ce = nn.CrossEntropyLoss()


def _trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                    enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kwargs})


class BNModule(ClassifierModule):
    """A tiny classifier with a BatchNorm layer (written like a user's module)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------------ functional core
def test_fgsm_on_a_linear_model_moves_along_the_sign_of_the_weight_row_difference():
    torch.manual_seed(0)
    lin = nn.Linear(5, 2)
    x = torch.randn(3, 5)
    y = torch.zeros(3, dtype=torch.long)
    # d CE / d x for target 0 is p_1 * (w_1 - w_0): its sign is sign(w_1 - w_0) whatever p_1 > 0 is
    expected = x + 0.3 * torch.sign(lin.weight[1] - lin.weight[0]).detach()
    torch.testing.assert_close(fgsm(lin, x, y, ce, 0.3), expected)
    # L2 fast gradient method: eps times the unit vector along w_1 - w_0
    diff = (lin.weight[1] - lin.weight[0]).detach()
    torch.testing.assert_close(fgsm(lin, x, y, ce, 0.3, norm="l2"), x + 0.3 * diff / diff.norm())
    assert all(p.grad is None for p in lin.parameters())  # input gradients only
    # clamped to the input range
    assert fgsm(lin, x, y, ce, 5.0, input_range=(-1.0, 1.0)).abs().max() <= 1.0


def test_pgd_stays_in_the_ball_and_the_input_range_and_raises_the_loss_step_by_step():
    torch.manual_seed(0)
    lin = nn.Linear(6, 2)
    x, y = torch.rand(8, 6), torch.randint(0, 2, (8,))
    losses = [ce(lin(x), y).item()]
    for steps in range(1, 6):
        x_adv = pgd(lin, x, y, ce, eps=0.2, alpha=0.05, steps=steps, random_start=False)
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6
        losses.append(ce(lin(x_adv), y).item())
    assert all(b >= a - 1e-6 for a, b in zip(losses, losses[1:])), losses  # a linear model: monotone
    assert losses[-1] > losses[0] + 0.05
    # enough steps reach FGSM's corner of the ball (the optimum for a linear model)
    torch.testing.assert_close(pgd(lin, x, y, ce, 0.2, alpha=0.05, steps=8, random_start=False),
                               fgsm(lin, x, y, ce, 0.2))
    # L2 ball, input range, random start
    gen = torch.Generator().manual_seed(1)
    x_adv = pgd(lin, x, y, ce, eps=0.5, steps=4, norm="l2", input_range=(0.0, 1.0), generator=gen)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_pgd_beats_fgsm_on_a_nonlinear_model_and_its_random_start_is_seeded():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    plain = ce(mlp(x), y).item()
    loss_fgsm = ce(mlp(fgsm(mlp, x, y, ce, 0.3)), y).item()
    loss_pgd = ce(mlp(pgd(mlp, x, y, ce, 0.3, steps=10, generator=torch.Generator().manual_seed(0))), y).item()
    assert plain < loss_fgsm <= loss_pgd + 1e-4
    a = pgd(mlp, x, y, ce, 0.3, steps=2, generator=torch.Generator().manual_seed(5))
    b = pgd(mlp, x, y, ce, 0.3, steps=2, generator=torch.Generator().manual_seed(5))
    c = pgd(mlp, x, y, ce, 0.3, steps=2, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vat_direction_is_the_dominant_eigenvector_of_the_kl_hessian():
    # logits = A x: the Hessian of KL(p(x) || p(x + r)) at r = 0 is A^T (diag(p) - p p^T) A
    torch.manual_seed(0)
    lin = nn.Linear(6, 4, bias=False).double()
    x = torch.randn(1, 6, dtype=torch.float64)
    p = lin(x).softmax(-1)[0].detach()
    a = lin.weight.detach()
    hessian = a.T @ (torch.diag(p) - torch.outer(p, p)) @ a
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    top = eigenvectors[:, -1]
    assert eigenvalues[-1] > 1.5 * eigenvalues[-2]  # a clear dominant direction
    r = vat_perturbation(lin, x, xi=1e-6, eps=2.0, power_iterations=20, generator=torch.Generator().manual_seed(0))
    assert r.norm().item() == pytest.approx(2.0)
    assert abs(torch.dot(r[0] / r.norm(), top).item()) > 0.999
    # the loss is the KL at r_adv, differentiable in the parameters only
    loss = vat_loss(lin, x, 1e-6, 2.0, 20, generator=torch.Generator().manual_seed(0))
    expected = F.kl_div(lin(x + r).log_softmax(-1), p.log()[None], log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-9)
    loss.backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_vat_power_iteration_survives_bf16_autocast():
    # xi * d with xi = 1e-6 vanishes in bf16 inputs: the power iteration runs outside autocast
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    x = torch.randn(16, 8)
    ref = vat_perturbation(mlp, x, power_iterations=3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = vat_perturbation(mlp, x, power_iterations=3, generator=torch.Generator().manual_seed(0))
    cosine = F.cosine_similarity(ref, got.float(), dim=1)
    assert cosine.abs().min() > 0.99


def test_input_gradient_with_a_loss_scale_equals_the_plain_one_and_backs_off_on_overflow():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    plain = input_gradient(lambda z: ce(mlp(z), y), x)
    torch.testing.assert_close(input_gradient(lambda z: ce(mlp(z), y), x, grad_scale=2.0**16), plain)
    # a loss scale that overflows fp32 (like fp16's range under AMP): lowered until finite
    scaled = input_gradient(lambda z: ce(mlp(z), y), x, grad_scale=1e300)
    assert torch.isfinite(scaled).all()
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-8)


def test_attacks_leave_batchnorm_statistics_and_parameter_gradients_alone():
    torch.manual_seed(0)
    model = BNModule().train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    bn = model.net[2]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    objects = [bn.running_mean, bn.running_var, bn.num_batches_tracked]
    pgd(model, x, y, ce, 0.1, steps=2, generator=torch.Generator().manual_seed(0))
    fgsm(model, x, y, ce, 0.1)
    vat_loss(model, x, generator=torch.Generator().manual_seed(0))
    with preserved_batchnorm_stats(model):
        model(x + 1.0)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert [bn.running_mean, bn.running_var, bn.num_batches_tracked] == objects  # the same tensors
    assert all(p.grad is None for p in model.parameters())
    model(x)  # a plain forward still updates them
    assert not torch.equal(bn.running_mean, before["running_mean"])


# ------------------------------------------------------------------------------------------------ adapters
class _Recorder(Callback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.module = copy.deepcopy(pl_module)
        self.batch = [t.clone() for t in batch]

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


@pytest.mark.parametrize("method", ["fgsm", "pgd", "vat"])
def test_parameter_gradients_are_those_of_clean_plus_weighted_adversarial_loss(method):
    L.seed_everything(0)
    model = DeepMLP(depth=3, width=16, optimizer="adam", lr=1e-2)
    if method == "vat":
        technique: Any = VirtualAdversarialTraining(eps=0.5, weight=0.7, seed=3)
    else:
        technique = AdversarialTraining(method, eps=0.1, steps=2, weight=0.7, seed=3, input_range=[0.0, 1.0])
    recorder = _Recorder()
    _trainer(max_steps=1, callbacks=[technique, recorder]).fit(model, DigitsDataModule(batch_size=16))
    ref = recorder.module
    x, y = recorder.batch
    gen = torch.Generator().manual_seed(technique.batch_seed(0, 0, 0))
    if method == "fgsm":
        adv = ce(ref(fgsm(ref, x, y, ce, 0.1, input_range=(0.0, 1.0))), y)
    elif method == "pgd":
        adv = ce(ref(pgd(ref, x, y, ce, 0.1, steps=2, input_range=(0.0, 1.0), generator=gen)), y)
    else:
        adv = vat_loss(ref, x, 1e-6, 0.5, 1, generator=gen)
    (ce(ref(x), y) + 0.7 * adv).backward()
    for name, param in ref.named_parameters():
        torch.testing.assert_close(recorder.grads[name], param.grad, rtol=1e-5, atol=1e-7)


def test_batchnorm_statistics_after_one_step_equal_the_plain_runs():
    def run(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        L.seed_everything(0)
        model = BNModule()
        _trainer(max_steps=1, callbacks=callbacks).fit(model, DigitsDataModule(batch_size=16))
        return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}

    plain = run([])
    for technique in (AdversarialTraining("pgd", eps=0.2, steps=2), VirtualAdversarialTraining(eps=1.0)):
        stats = run([technique])
        for key, value in plain.items():
            assert torch.equal(stats[key], value), key


def test_bf16_mixed_on_cpu_trains_with_both_terms_and_logs_them():
    L.seed_everything(0)
    model = DeepMLP(depth=3, width=16, optimizer="adam", lr=1e-2)
    trainer = _trainer(max_steps=3, precision="bf16-mixed", log_every_n_steps=1,
                       callbacks=[AdversarialTraining("pgd", eps=0.1, steps=2, input_range=[0.0, 1.0]),
                                  VirtualAdversarialTraining(eps=0.5)])
    trainer.fit(model, DigitsDataModule(batch_size=16))
    metrics = trainer.callback_metrics
    for key in ("adversarial/loss", "adversarial/accuracy", "vat/loss"):
        assert torch.isfinite(metrics[key]), key
    assert metrics["adversarial/loss"] > 0 and metrics["vat/loss"] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_vat_refuses_true_half_precision_before_any_step():
    model = DeepMLP(depth=2, width=8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="bf16-true"):
        _trainer(max_steps=1, precision="bf16-true", callbacks=[VirtualAdversarialTraining()]).fit(
            model, DigitsDataModule(batch_size=16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "training_step" not in vars(model)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": -0.1}, ValueError, "eps"),
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": 1.5}, TypeError, "steps"),
    ({"weight": -1.0}, ValueError, "weight"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"method": "cw"}, ValueError, "method"),
    ({"norm": "l1"}, ValueError, "norm"),
    ({"input_range": [1.0, 0.0]}, ValueError, "input_range"),
    ({"input_range": [0.0]}, TypeError, "input_range"),
    ({"random_start": "yes"}, TypeError, "random_start"),
    ({"seed": -1}, ValueError, "seed"),
    ({"log": 1}, TypeError, "log must be"),
])
def test_adversarial_training_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdversarialTraining(**kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"eps": 0.0}, ValueError, "eps"),
    ({"xi": -1e-6}, ValueError, "xi"),
    ({"power_iterations": 0}, ValueError, "power_iterations"),
    ({"weight": -0.5}, ValueError, "weight"),
])
def test_virtual_adversarial_training_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        VirtualAdversarialTraining(**kwargs)


def test_core_bad_input():
    lin = nn.Linear(2, 2)
    x, y = torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="eps"):
        fgsm(lin, x, y, ce, 0.0)
    with pytest.raises(ValueError, match="steps"):
        pgd(lin, x, y, ce, 0.1, steps=0)
    with pytest.raises(ValueError, match="norm"):
        pgd(lin, x, y, ce, 0.1, norm="l0")  # type: ignore[arg-type]


def test_a_module_without_a_criterion_attribute_is_refused_in_setup():
    class NoCriterion(DeepMLP):
        def __init__(self) -> None:
            super().__init__(depth=2, width=8)
            del self.criterion

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

    with pytest.raises(AttributeError, match="criterion"):
        _trainer(max_steps=1, callbacks=[AdversarialTraining()]).fit(NoCriterion(), DigitsDataModule(batch_size=16))


def test_discrete_inputs_are_refused_with_a_clear_error():
    technique = AdversarialTraining()
    technique._criterion_name = "criterion"
    model = DeepMLP(depth=2, width=8)
    batch = (torch.zeros(4, 64, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        technique._term(model, batch, 0, torch.zeros(()))
    with pytest.raises(TypeError, match="floating-point"):
        VirtualAdversarialTraining()._term(model, batch, 0, torch.zeros(()))


# ------------------------------------------------------------------------------------------------ effect
def _robust_accuracy(model: Any, data: DigitsDataModule, eps: float) -> tuple[float, float]:
    model.eval()
    clean = robust = total = 0
    for x, y in data.test_dataloader():
        x_adv = pgd(model, x, y, ce, eps, steps=10, input_range=(0.0, 1.0), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
            robust += (model(x_adv).argmax(1) == y).sum().item()
        total += len(y)
    return clean / total, robust / total


def test_pgd_training_raises_robust_accuracy_beside_standard_training():
    results = {}
    for name, callbacks in (("standard", []),
                            ("pgd", [AdversarialTraining("pgd", eps=0.1, steps=3, input_range=[0.0, 1.0])])):
        L.seed_everything(0)
        data = DigitsDataModule(batch_size=64)
        model = DeepMLP(depth=3, width=64, optimizer="adam", lr=1e-2)
        _trainer(max_epochs=6, callbacks=callbacks).fit(model, data)
        data.setup("test")
        results[name] = _robust_accuracy(model, data, 0.1)
    (clean_std, robust_std), (clean_adv, robust_adv) = results["standard"], results["pgd"]
    assert clean_std > 0.85 and clean_adv > 0.85, results
    assert robust_adv > robust_std + 0.15, results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 AMP needs CUDA")
def test_fp16_mixed_on_gpu_attack_signs_survive_underflow():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()
    x, y = torch.rand(512, 64, device="cuda"), torch.randint(0, 10, (512,), device="cuda")
    ref = fgsm(mlp, x, y, ce, 0.1) - x  # fp32
    with torch.autocast("cuda", dtype=torch.float16):
        scaled = fgsm(mlp, x, y, ce, 0.1, grad_scale=2.0**16) - x
        unscaled = fgsm(mlp, x, y, ce, 0.1) - x
    agree_scaled = (scaled.sign() == ref.sign()).float().mean().item()
    agree_unscaled = (unscaled.sign() == ref.sign()).float().mean().item()
    assert agree_scaled > 0.97, (agree_scaled, agree_unscaled)
    assert agree_scaled >= agree_unscaled
    # and a 16-mixed run with both terms trains with finite losses
    L.seed_everything(0)
    model = DeepMLP(depth=3, width=32, optimizer="adam", lr=1e-2)
    trainer = L.Trainer(max_steps=3, precision="16-mixed", accelerator="gpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        log_every_n_steps=1,
                        callbacks=[AdversarialTraining("pgd", eps=0.1, steps=2), VirtualAdversarialTraining(eps=0.5)])
    trainer.fit(model, DigitsDataModule(batch_size=32))
    assert torch.isfinite(trainer.callback_metrics["adversarial/loss"])
    assert torch.isfinite(trainer.callback_metrics["vat/loss"])
