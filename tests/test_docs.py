"""The documentation stays true: the docs site builds strictly and offline, documents every public name, and every
`lightning-techniques` command it (and the README) shows works as described."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lightning_techniques as lt
from lightning_techniques.demo.cli import TechniquesCLI

ROOT = Path(__file__).resolve().parents[1]
CLI_DOC = (ROOT / "docs" / "cli.md").read_text()

# Loaded into the docs build's interpreter: any attempt to open a network connection fails the build.
_NO_NETWORK = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("tests/test_docs.py: the docs build must not use the network")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("site")
    hook = tmp_path_factory.mktemp("offline")
    (hook / "sitecustomize.py").write_text(_NO_NETWORK)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out), "--config-file",
         str(ROOT / "mkdocs.yml")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**_env(), "PYTHONPATH": str(hook)},
    )
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stderr, result.stderr
    assert elapsed < 120, f"the docs build took {elapsed:.0f} s"
    return out


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_docs_build_strictly_offline_with_one_page_per_area(site: Path) -> None:
    for area in ("init", "regularization", "data", "normalization", "augment", "optim", "evaluation", "interpret",
                 "reproducibility", "testing", "demo"):
        assert (site / "api" / area / "index.html").is_file(), area
    assert (site / "resume" / "index.html").is_file() and (site / "cli" / "index.html").is_file()


def test_every_public_name_has_rendered_api_docs(site: Path) -> None:
    html = "".join(page.read_text() for page in site.rglob("*.html"))
    anchors = set(re.findall(r'id="(lightning_techniques\.[\w.]+)"', html))
    documented = {anchor.rsplit(".", 1)[1] for anchor in anchors}
    missing = sorted(set(lt.__all__) - documented)
    assert not missing, f"public names without an API entry: {missing}"
    # a technique's entry carries its paper (from the docstring) and its argument table
    lsuv = (site / "api" / "init" / "index.html").read_text()
    assert "Mishkin" in lsuv and "tolerance" in lsuv


def _commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = " ".join(command.split("#")[0].split())
            if command.startswith("lightning-techniques "):
                commands.append(command)
    return commands


def test_cli_doc_commands_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each `lightning-techniques` command of docs/cli.md and of the README, as written (configs resolved from the
    repository, the file the page shows written out), for one batch (fast_dev_run); the help command prints that
    callback's arguments."""
    added = re.search(r"```yaml\n# add_autoclip.yaml\n(.*?)```", CLI_DOC, flags=re.S)
    assert added, "docs/cli.md shows add_autoclip.yaml"
    (tmp_path / "add_autoclip.yaml").write_text(added.group(1))
    commands = _commands(CLI_DOC)
    assert len(commands) >= 5
    readme_commands = _commands((ROOT / "README.md").read_text())
    assert len(readme_commands) >= 3
    for command in dict.fromkeys(commands + readme_commands):
        args = shlex.split(command)[1:]
        args = [str(ROOT / a) if a.startswith("configs/") else a for a in args]
        if "my_package.MyModule" in args:
            continue  # stands for the user's own classes
        if "--trainer.callbacks.help" in args:
            with pytest.raises(SystemExit) as exit_info:
                TechniquesCLI(args=args)
            assert exit_info.value.code == 0
            assert "--trainer.callbacks.tolerance" in capsys.readouterr().out
            continue
        cli = TechniquesCLI(args=args + ["--trainer.fast_dev_run=1", f"--trainer.default_root_dir={tmp_path}"])
        assert cli.trainer.state.finished, command
        assert cli.tested_checkpoint is not None and cli.tested_checkpoint.is_file(), command


def _callbacks(*args: str) -> list[str]:
    cli = TechniquesCLI(run=False, args=list(args))
    return [type(cb).__name__ for cb in cli.trainer.callbacks if type(cb).__module__.startswith("lightning_techniques")]


def test_cli_composition_behaves_as_documented(tmp_path: Path) -> None:
    digits = str(ROOT / "configs" / "digits.yaml")
    base = ["LSUVInit", "EarlyStopping", "EvaluationReport"]
    assert _callbacks("--config", digits)[:3] == base
    # += appends (and the next argument configures the callback just added)
    cli = TechniquesCLI(run=False, args=["--config", digits, "--trainer.callbacks+=lightning_techniques.AutoClip",
                                         "--trainer.callbacks.percentile=5"])
    (autoclip,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AutoClip"]
    assert autoclip.percentile == 5 and {"LSUVInit", "EarlyStopping"} <= {type(c).__name__ for c in cli.trainer.callbacks}
    # a later --config file replaces the callback list ...
    names = _callbacks("--config", digits, "--config", str(ROOT / "configs" / "callbacks" / "AutoClip.yaml"))
    assert "AutoClip" in names and not set(base) & set(names)
    # ... unless its key is written callbacks+:
    (tmp_path / "add.yaml").write_text(yaml.safe_dump(
        {"trainer": {"callbacks+": [{"class_path": "lightning_techniques.AutoClip"}]}}))
    assert _callbacks("--config", digits, "--config", str(tmp_path / "add.yaml"))[:4] == base + ["AutoClip"]
    # the precision plugin from the command line
    cli = TechniquesCLI(run=False, args=["--config", digits, "--trainer.plugins=lightning_techniques.SmartMixedPrecision",
                                         "--trainer.plugins.precision=32-true"])
    assert type(cli.trainer.precision_plugin).__name__ == "SmartMixedPrecision"


def test_readme_install_and_test_commands_are_consistent() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->")[1].split("<!-- /test-command -->")[0]
    assert "python -m pytest" in block
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme, "the fresh-machine CPU install is documented"
    for command in _commands(readme):
        args = shlex.split(command)[1:]
        for arg in args:
            if arg.startswith("configs/"):
                assert (ROOT / arg).is_file(), f"README names a missing config: {arg}"
