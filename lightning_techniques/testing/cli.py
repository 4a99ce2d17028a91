"""Building a Trainer (and its callbacks) from a LightningCLI YAML file, as users configure runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def build_from_yaml(config: str | Path | dict[str, Any], extra_args: list[str] | None = None) -> Any:
    """Instantiate ``LightningCLI(run=False)`` over the demo models/datamodules from a config (path or dict).

    Returns the CLI object (``cli.trainer``, ``cli.model``, ``cli.datamodule``).
    """
    from lightning_techniques.demo.cli import TechniquesCLI

    if isinstance(config, dict):
        args = ["--config", yaml.safe_dump(config)]
    else:
        args = ["--config", str(config)]
    return TechniquesCLI(run=False, args=args + list(extra_args or []))
