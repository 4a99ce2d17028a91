"""The README stays true: its quick-start snippet runs, its YAML builds, and its technique table lists every public
technique class."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import Precision

import lightning_techniques as lt
from lightning_techniques.testing import build_from_yaml

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", README, flags=re.S)
    assert match, f"README has no {language} block"
    return match.group(1)


def test_quickstart_snippet_runs(tmp_path: Path) -> None:
    code = _block("python").replace("max_epochs=20", "max_epochs=1, limit_train_batches=3, limit_val_batches=1")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["trainer"].current_epoch == 1


def test_quickstart_yaml_builds(tmp_path: Path) -> None:
    config = yaml.safe_load(_block("yaml"))
    cli = build_from_yaml(config, extra_args=[f"--trainer.default_root_dir={tmp_path}"])
    assert {"LSUVInit", "EarlyStopping"} <= {type(cb).__name__ for cb in cli.trainer.callbacks}


def test_table_lists_every_public_technique() -> None:
    table = README.split("<!-- techniques-table -->")[1].split("<!-- /techniques-table -->")[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.M))
    techniques = {
        name for name in lt.__all__
        if isinstance(getattr(lt, name), type) and issubclass(getattr(lt, name), (Callback, Precision))
    }
    assert techniques <= listed, f"README table misses {sorted(techniques - listed)}"
    assert listed <= set(lt.__all__), f"README table names unknown classes {sorted(listed - set(lt.__all__))}"
