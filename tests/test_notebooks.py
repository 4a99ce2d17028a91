"""The notebooks: each is built by one builder (``notebooks/_build_<name>.py``) whose cells are exactly the committed
notebook's, the committed outputs hold every figure and no machine path or warning, and each notebook runs top to
bottom in a fresh kernel with every plotting cell producing its image."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
BUILDERS = sorted((ROOT / "notebooks").glob("_build_*.py"))
IDS = [p.name for p in NOTEBOOKS]

# what must not appear in a committed output: a machine's own paths, warnings
MACHINE_PATH = re.compile(r"(/tmp/|/work/|/home/|/Users/|site-packages|C:\\\\)")
WARNING = re.compile(r"(Warning|WARNING|warn\()")


def _builder_cells(notebook: Path) -> list[tuple[str, str]]:
    builder = notebook.with_name(f"_build_{notebook.stem}.py")
    assert builder.is_file(), f"{notebook.name} has no builder {builder.name}"
    spec = importlib.util.spec_from_file_location(f"_nb_builder_{notebook.stem}", builder)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a builder only executes its notebook under __main__
    assert module.NOTEBOOK == notebook.name
    return list(module.CELLS)


def _cells(notebook: Any) -> list[tuple[str, str]]:
    return [("md" if cell.cell_type == "markdown" else "code", cell.source) for cell in notebook.cells]


PLOT_CALL = re.compile(r"plt\.show\(\)|display\(Image\(")


def _plotting_cells(notebook: Any) -> list[int]:
    """Indices of the code cells that show a figure: a top-level ``plt.show()`` / ``display(Image(...))``, or a call of a
    function (defined in an earlier cell) whose body does. A definition alone shows nothing."""
    helpers: set[str] = set()
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        top_level, body, name, indent = [], [], None, 0
        for line in cell.source.splitlines():
            stripped = line.lstrip()
            depth = len(line) - len(stripped)
            if name is not None and (not stripped or depth > indent):
                body.append(line)
                continue
            if name is not None and PLOT_CALL.search("\n".join(body)):
                helpers.add(name)
            name = None
            match = re.match(r"def (\w+)\(", stripped)
            if match:
                name, indent, body = match.group(1), depth, []
            else:
                top_level.append(line)
        if name is not None and PLOT_CALL.search("\n".join(body)):
            helpers.add(name)
        code = "\n".join(top_level)
        if PLOT_CALL.search(code) or any(re.search(rf"\b{h}\(", code) for h in helpers):
            found.append(index)
    return found


def _problems(notebook: Any) -> list[str]:
    """Errors, missing figures, machine paths and warnings in a notebook's outputs."""
    problems = []
    plotting = set(_plotting_cells(notebook))
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        outputs = cell.get("outputs", [])
        if index in plotting and not any("image/png" in out.get("data", {}) for out in outputs):
            problems.append(f"cell {index} plots but holds no image")
        for out in outputs:
            if out.get("output_type") == "error":
                problems.append(f"cell {index} raised {out.get('ename')}: {out.get('evalue')}")
            text = out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
            if MACHINE_PATH.search(text):
                problems.append(f"cell {index} shows a machine path: {MACHINE_PATH.search(text).group(0)!r}")
            if out.get("name") == "stderr" and WARNING.search(text):
                problems.append(f"cell {index} prints a warning: {text[:200]!r}")
    return problems


def test_every_builder_has_its_notebook() -> None:
    assert {b.name for b in BUILDERS} == {f"_build_{n.stem}.py" for n in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_builder_regenerates_the_committed_cells(path: Path) -> None:
    import nbformat

    committed = _cells(nbformat.read(path, as_version=4))
    built = _builder_cells(path)
    drift = [i for i, (a, b) in enumerate(zip(committed, built)) if a != b]
    assert len(committed) == len(built) and not drift, (
        f"{path.name} differs from its builder (cells {drift}, {len(committed)} vs {len(built)} cells): "
        f"run python notebooks/_build_{path.stem}.py"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs_show_the_figures_and_nothing_of_the_machine(path: Path) -> None:
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    plotting = _plotting_cells(notebook)
    assert plotting, f"{path.name} shows no figure"
    assert all(notebook.cells[i].get("outputs") for i in plotting), f"{path.name} was committed without its outputs"
    assert not _problems(notebook)


def test_problems_are_detected() -> None:
    """The checks above catch what they are for: a plotting cell without an image, a path, a warning."""
    import nbformat

    bare = nbformat.v4.new_code_cell("plt.plot([1]); plt.show()")
    bare.outputs = [nbformat.v4.new_output("stream", name="stderr",
                                           text="/tmp/x/site-packages/a.py:1: UserWarning: careful\n")]
    problems = _problems(nbformat.v4.new_notebook(cells=[bare]))
    assert any("no image" in p for p in problems) and any("machine path" in p for p in problems)
    assert any("warning" in p for p in problems)
    helper = nbformat.v4.new_code_cell("def show(path):\n    display(Image(filename=path))\nx = 1")
    uses = nbformat.v4.new_code_cell("for p in paths:\n    show(p)")
    other = nbformat.v4.new_code_cell("print(1)")
    assert _plotting_cells(nbformat.v4.new_notebook(cells=[helper, uses, other])) == [1]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    # CI exports MPLBACKEND=Agg; a kernel that inherits it shows no figure (plt.show() draws nothing inline)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    assert not _problems(notebook)
