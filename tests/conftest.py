"""Shared pytest set-up: markers, GPU skipping, quiet Lightning, small thread counts on the 2-core CI machine."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch

os.environ.setdefault("PYTHONHASHSEED", "0")
# the suite's models are tiny: one intra-op thread is faster than two on the 2-core CI machine
torch.set_num_threads(1)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine); run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own temporary working directory, so a Trainer without ``default_root_dir`` (which
    defaults to the working directory) never writes logs or artefacts into the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _restore_global_torch_flags():
    """``Trainer(deterministic=True)`` switches torch's deterministic algorithms on for the whole process and never
    back; each test starts from, and leaves, the defaults so tests do not depend on their order."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture
def trainer_kwargs() -> dict:
    """Quiet single-CPU Trainer settings for integration tests."""
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
