"""WeightInit / init_weights: each scheme's weight statistics against its formula, the layer plan (precedence,
patterns, symmetry refusal), and the adapter (once at fit start, never on resume, seeded, bad input)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_techniques import WeightInit
from lightning_techniques.demo import DeepMLP, DigitsCNN, DigitsDataModule
from lightning_techniques.functional import init_weights
from lightning_techniques.init.weight_init import InitSpec, expected_std, fans


def _trainer(**kwargs: Any) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    base.update(kwargs)
    return L.Trainer(**base)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_variance(weight: torch.Tensor, variance: float) -> None:
    """Sample variance within 5 standard errors of ``variance`` (sd of a sample variance <= var * sqrt(2/n) for the
    normal and the uniform distribution); mean within 5 standard errors of 0."""
    w = weight.detach().double().flatten()
    n = w.numel()
    assert abs(float(w.var()) - variance) < 5 * variance * math.sqrt(2.0 / n), (float(w.var()), variance)
    assert abs(float(w.mean())) < 5 * math.sqrt(variance / n)


# ------------------------------------------------------------------------------------------------ schemes vs formulas
@pytest.mark.parametrize("layer", [nn.Linear(400, 300), nn.Conv2d(64, 96, 3)], ids=["linear", "conv"])
def test_he_normal_variance_is_two_over_fan_in(layer: nn.Module) -> None:
    init_weights(layer, "kaiming_normal", generator=_gen())
    fan_in, _ = fans(layer.weight)
    assert fan_in == (400 if isinstance(layer, nn.Linear) else 64 * 9)
    _check_variance(layer.weight, 2.0 / fan_in)
    assert torch.all(layer.bias == 0)


def test_he_fan_out_and_nonlinearity_gains() -> None:
    layer = nn.Linear(500, 200)
    init_weights(layer, "kaiming_normal", mode="fan_out", generator=_gen())
    _check_variance(layer.weight, 2.0 / 200)
    init_weights(layer, "kaiming_normal", nonlinearity="leaky_relu", negative_slope=0.2, generator=_gen(1))
    _check_variance(layer.weight, 2.0 / ((1 + 0.2**2) * 500))
    init_weights(layer, "kaiming_normal", nonlinearity="tanh", generator=_gen(2))
    _check_variance(layer.weight, (5.0 / 3.0) ** 2 / 500)
    init_weights(layer, "kaiming_normal", nonlinearity="linear", generator=_gen(3))
    _check_variance(layer.weight, 1.0 / 500)


def test_he_uniform_bound_and_variance() -> None:
    layer = nn.Linear(600, 250)
    init_weights(layer, "kaiming_uniform", generator=_gen())
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 600)
    assert float(layer.weight.detach().abs().max()) <= bound
    assert float(layer.weight.detach().abs().max()) > 0.99 * bound
    _check_variance(layer.weight, 2.0 / 600)


def test_xavier_uniform_and_normal() -> None:
    layer = nn.Linear(400, 300)
    init_weights(layer, "xavier_uniform", generator=_gen())
    bound = math.sqrt(6.0 / 700)
    assert bound * 0.99 < float(layer.weight.detach().abs().max()) <= bound
    _check_variance(layer.weight, 2.0 / 700)
    init_weights(layer, "xavier_normal", gain=2.0, generator=_gen(1))
    _check_variance(layer.weight, 4.0 * 2.0 / 700)
    conv = nn.Conv1d(32, 48, 5)
    init_weights(conv, "xavier_normal", generator=_gen(2))
    _check_variance(conv.weight, 2.0 / (32 * 5 + 48 * 5))


def test_plain_uniform_normal_zeros_and_constant_bias() -> None:
    layer = nn.Linear(500, 300)
    init_weights(layer, "uniform", bound=0.1, bias=0.25, generator=_gen())
    assert float(layer.weight.detach().abs().max()) <= 0.1
    _check_variance(layer.weight, 0.1**2 / 3)
    assert torch.all(layer.bias == 0.25)
    init_weights(layer, "normal", std=0.03, bias=None, generator=_gen(1))
    _check_variance(layer.weight, 0.03**2)
    assert torch.all(layer.bias == 0.25), "bias=None keeps the biases"
    init_weights(layer, "zeros")
    assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)


@pytest.mark.parametrize("shape", [(64, 200), (200, 64)])
def test_orthogonal_rows_or_columns_are_orthonormal_times_gain(shape: tuple[int, int]) -> None:
    layer = nn.Linear(shape[1], shape[0])
    init_weights(layer, "orthogonal", gain=1.5, generator=_gen())
    w = layer.weight.detach().double()
    gram = w @ w.T if shape[0] <= shape[1] else w.T @ w
    assert torch.allclose(gram, 1.5**2 * torch.eye(min(shape), dtype=torch.float64), atol=1e-5)
    assert math.isclose(float(w.std(unbiased=False)), expected_std(InitSpec("orthogonal", gain=1.5), w), rel_tol=0.02)


def test_expected_std_matches_the_samples_for_every_random_scheme() -> None:
    for scheme in ("xavier_uniform", "xavier_normal", "kaiming_normal", "kaiming_uniform", "uniform", "normal"):
        layer = nn.Conv2d(48, 64, 3)
        init_weights(layer, scheme, generator=_gen())
        _check_variance(layer.weight, expected_std(InitSpec(scheme), layer.weight) ** 2)


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    a, b = DigitsCNN(channels=4), DigitsCNN(channels=4)
    state = torch.get_rng_state()
    init_weights(a, "xavier_normal", generator=_gen(7))
    init_weights(b, "xavier_normal", generator=_gen(7))
    assert torch.equal(state, torch.get_rng_state())
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------------------------------- the plan
def test_by_name_wins_over_by_type_which_wins_over_the_default() -> None:
    model = DigitsCNN(channels=4)
    records = init_weights(model, "kaiming_normal", by_type={"Linear": "xavier_uniform"},
                           by_name={"features.0": {"scheme": "normal", "std": 0.5}}, generator=_gen())
    schemes = {r.layer: r.scheme for r in records}
    assert schemes == {"features.0": "normal", "features.2": "kaiming_normal", "features.5": "kaiming_normal",
                       "head": "xavier_uniform"}
    assert 0.2 < float(model.features[0].weight.std()) < 0.9


def test_zero_initialising_a_hidden_stack_is_refused_and_nothing_changes() -> None:
    model = DeepMLP(depth=4)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="symmetric"):
        init_weights(model, "zeros")
    with pytest.raises(ValueError, match="'net.3' and 'net.5'"):
        init_weights(model, "kaiming_normal", by_name={"net.3": "zeros", "net.5": "zeros"})
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    # only the classifier zero: fine (a common choice), as are non-adjacent zero layers
    init_weights(model, "kaiming_normal", by_name={"net.7": "zeros"}, generator=_gen())
    assert torch.all(model.net[7].weight == 0) and model.net[1].weight.abs().sum() > 0


def test_patterns_and_types_that_match_nothing_list_the_layers() -> None:
    model = DigitsCNN(channels=4)
    with pytest.raises(ValueError, match=r"\['classifier'\] match no layer.*features\.0 \(Conv2d\).*head \(Linear\)"):
        init_weights(model, by_name={"classifier": "zeros"})
    with pytest.raises(ValueError, match=r"\['Conv1d'\].*no such layer.*head \(Linear\)"):
        init_weights(model, by_type={"Conv1d": "orthogonal"})
    with pytest.raises(ValueError, match="cannot import layer type"):
        init_weights(model, by_type={"NoSuchLayer": "zeros"})
    with pytest.raises(ValueError, match=">= 2 dimensions"):
        init_weights(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), by_name={"1": "orthogonal"})


# ------------------------------------------------------------------------------------------------------ the adapter
class _Probe(Callback):
    """Records the weights at on_train_start (after every on_fit_start)."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_initialises_at_fit_start_with_the_formula_and_the_seed() -> None:
    probes = []
    for _ in range(2):
        probe = _Probe()
        L.seed_everything(11, verbose=False)
        module = DigitsCNN(channels=16)
        cb = WeightInit("kaiming_normal", by_name={"head": "zeros"}, bias=0.1, seed=5)
        _trainer(max_steps=1, callbacks=[cb, probe]).fit(module, datamodule=DigitsDataModule(batch_size=32))
        probes.append(probe)
        assert cb.done and [r["layer"] for r in cb.report] == ["features.0", "features.2", "features.5", "head"]
    w = probes[0].weights
    assert torch.all(w["head.weight"] == 0) and torch.all(w["head.bias"] == 0.1)
    conv = w["features.5.weight"]  # Conv2d(16, 32, 3): fan_in 144, 4608 samples
    _check_variance(conv, 2.0 / (16 * 9))
    assert torch.all(w["features.5.bias"] == 0.1)
    for key in w:
        assert torch.equal(w[key], probes[1].weights[key]), key


def test_bad_plan_is_refused_in_setup_before_any_step() -> None:
    module = DeepMLP(depth=3)
    trainer = _trainer(max_steps=2, callbacks=[WeightInit("zeros")])
    with pytest.raises(ValueError, match="symmetric"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0
    trainer = _trainer(max_steps=2, callbacks=[WeightInit(by_name={"nope*": "zeros"})])
    with pytest.raises(ValueError, match="Layers in the model"):
        trainer.fit(DigitsCNN(channels=4), datamodule=DigitsDataModule(batch_size=32))
    assert trainer.global_step == 0


def test_not_rerun_on_resume(tmp_path: Path) -> None:
    ckpt = tmp_path / "step2.ckpt"
    module = DigitsCNN(channels=4)
    trainer = _trainer(max_steps=2, callbacks=[WeightInit("xavier_normal", seed=1)], default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(ckpt)
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    # resume with a different scheme and seed: the run ends at once (max_steps reached), weights are the checkpoint's
    resumed, cb = DigitsCNN(channels=4), WeightInit("normal", std=3.0, seed=99)
    _trainer(max_steps=2, callbacks=[cb], default_root_dir=str(tmp_path)).fit(
        resumed, datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(ckpt))
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert cb.done and [r["scheme"] for r in cb.report][0] == "xavier_normal", "report comes from the checkpoint"


def test_second_fit_of_the_same_callback_does_not_reinitialise() -> None:
    module, cb = DigitsCNN(channels=4), WeightInit("normal", std=0.1, seed=2)
    _trainer(max_steps=2, callbacks=[cb]).fit(module, datamodule=DigitsDataModule(batch_size=32))
    after_first = {k: v.clone() for k, v in module.state_dict().items()}
    _trainer(max_steps=2, callbacks=[cb]).fit(module, datamodule=DigitsDataModule(batch_size=32))
    # the second fit trains on from the first fit's weights (continues, not re-drawn): the head moved only a little
    assert not torch.equal(after_first["head.weight"], module.state_dict()["head.weight"])
    assert (after_first["head.weight"] - module.state_dict()["head.weight"]).abs().max() < 0.05


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "he"}, ValueError, "scheme='he' is not allowed"),
        ({"mode": "fan_avg"}, ValueError, "mode='fan_avg'"),
        ({"nonlinearity": "swish"}, ValueError, "nonlinearity='swish'"),
        ({"std": 0.0}, ValueError, "std must be"),
        ({"by_name": {"head": "zero"}}, ValueError, r"by_name\['head'\]: scheme='zero'"),
        ({"by_name": {"head": {"scheme": "zeros", "sd": 1}}}, ValueError, r"unknown option\(s\) \['sd'\]"),
        ({"by_type": ["Linear"]}, TypeError, "by_type must be a mapping"),
        ({"layer_types": ["NotALayer"]}, ValueError, "cannot import layer type"),
        ({"seed": -1}, ValueError, "seed must be"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        WeightInit(**kwargs)
