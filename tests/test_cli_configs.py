"""The demo's LightningCLI config builds. (Every technique's own YAML example, configs/callbacks/<Class>.yaml or
configs/plugins/<Class>.yaml, is built by the registry's contract test, tests/test_contract.py::test_builds_from_yaml.)
"""

from __future__ import annotations

from pathlib import Path

from lightning_techniques.testing import build_from_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_main_demo_config_builds(tmp_path: Path) -> None:
    cli = build_from_yaml(ROOT / "configs" / "digits.yaml", extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"LSUVInit", "EarlyStopping"} <= names
    assert type(cli.model).__name__ == "DigitsCNN"
