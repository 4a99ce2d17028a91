"""Every public Callback class builds from a LightningCLI YAML config (configs/callbacks/<ClassName>.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

import lightning_techniques as lt
from lightning_techniques.testing import build_from_yaml

ROOT = Path(__file__).resolve().parents[1]
CALLBACK_CONFIGS = ROOT / "configs" / "callbacks"
PUBLIC_CALLBACKS = sorted(
    name for name in lt.__all__ if isinstance(getattr(lt, name), type) and issubclass(getattr(lt, name), Callback)
)


def test_every_public_callback_has_a_yaml_example() -> None:
    missing = [name for name in PUBLIC_CALLBACKS if not (CALLBACK_CONFIGS / f"{name}.yaml").exists()]
    assert not missing, f"add configs/callbacks/<name>.yaml for {missing}"


@pytest.mark.parametrize("name", PUBLIC_CALLBACKS)
def test_callback_builds_from_yaml(name: str, tmp_path: Path) -> None:
    path = CALLBACK_CONFIGS / f"{name}.yaml"
    config = yaml.safe_load(path.read_text())
    entries = config["trainer"]["callbacks"]
    cli = build_from_yaml(path, extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    built = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == name]
    assert built, f"{name} not among the Trainer's callbacks"
    entry = next(e for e in entries if e["class_path"].rsplit(".", 1)[-1] == name)
    for key, value in (entry.get("init_args") or {}).items():
        assert hasattr(built[0], key), f"{name} does not keep init arg {key!r} as an attribute"
        got = getattr(built[0], key)
        if isinstance(value, (int, float, str, bool)) and isinstance(got, (int, float, str, bool)):
            assert got == value, f"{name}.{key}: YAML {value!r} -> built {got!r}"


def test_main_demo_config_builds(tmp_path: Path) -> None:
    cli = build_from_yaml(ROOT / "configs" / "digits.yaml", extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}
    assert {"LSUVInit", "EarlyStopping"} <= names
    assert type(cli.model).__name__ == "DigitsCNN"
