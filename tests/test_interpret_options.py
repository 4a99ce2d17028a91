"""One name for one option: ``every_n_val_epochs`` on every evaluation logger; ``every_n_epochs`` is a deprecated
alias of the attribution loggers."""

from __future__ import annotations

import inspect
import warnings

import pytest

from lightning_techniques import (
    AttentionMapLogger,
    DeepLiftLogger,
    EvaluationReport,
    GradCAMLogger,
    IntegratedGradientsLogger,
    LIMELogger,
    PermutationImportance,
    SaliencyLogger,
    SHAPLogger,
    TSNELogger,
)

ATTRIBUTION = [SaliencyLogger, IntegratedGradientsLogger, DeepLiftLogger, GradCAMLogger, SHAPLogger, LIMELogger]
ALL = [*ATTRIBUTION, TSNELogger, AttentionMapLogger, EvaluationReport, PermutationImportance]


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_logger_takes_every_n_val_epochs(cls) -> None:
    assert "every_n_val_epochs" in inspect.signature(cls.__init__).parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the new name is not deprecated
        assert cls(every_n_val_epochs=3).every_n_val_epochs == 3


@pytest.mark.parametrize("cls", ATTRIBUTION, ids=lambda c: c.__name__)
def test_every_n_epochs_is_a_deprecated_alias(cls) -> None:
    default = cls().every_n_val_epochs
    assert default == cls.default_every_n_val_epochs >= 1
    with pytest.warns(FutureWarning, match="every_n_val_epochs=7"):
        logger = cls(every_n_epochs=7)
    assert logger.every_n_val_epochs == 7
    with pytest.warns(FutureWarning, match="every_n_val_epochs"):
        assert logger.every_n_epochs == 7
    with pytest.raises(ValueError, match="every_n_val_epochs=3 and every_n_epochs=7.*pass only every_n_val_epochs"):
        cls(every_n_val_epochs=3, every_n_epochs=7)
    with pytest.raises(ValueError, match="every_n_val_epochs"), pytest.warns(FutureWarning):
        cls(every_n_epochs=0)
