"""The one builder format of the notebooks: each ``_build_NN_name.py`` defines ``NOTEBOOK`` (the file name) and
``CELLS`` (a list of ``("md" | "code", source)``) and, run as a script from the repository root, calls :func:`build`.
``tests/test_notebooks.py`` checks that every committed notebook's cells are exactly its builder's ``CELLS``."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def new_notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": dict(KERNELSPEC)})
    for kind, source in cells:
        if kind not in ("md", "code"):
            raise ValueError(f"cell kind must be 'md' or 'code', got {kind!r}")
        notebook.cells.append(nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source))
    return notebook


def execute(notebook: nbformat.NotebookNode, timeout: int = 900) -> float:
    """Run ``notebook`` top to bottom in a fresh kernel, in a temporary working directory, with matplotlib's inline
    backend (``MPLBACKEND`` is removed from the kernel's environment so figures become cell outputs); seconds taken."""
    saved = os.environ.pop("MPLBACKEND", None)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": tmp}}).execute()
    finally:
        if saved is not None:
            os.environ["MPLBACKEND"] = saved
    return time.perf_counter() - started


def build(name: str, cells: list[tuple[str, str]]) -> None:
    """Execute the cells as a notebook and write it (with its outputs) to ``notebooks/<name>``."""
    notebook = new_notebook(cells)
    seconds = execute(notebook)
    for cell in notebook.cells:  # execution metadata (timestamps) would make every rebuild a diff
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(notebook, HERE / name)
    print(f"wrote {HERE / name} (executed in {seconds:.0f} s)")
