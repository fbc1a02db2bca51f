"""The `%%torchrun` cell magic: a cell meant for every rank, not for this kernel.

Such a cell uses `rank`, `world_size` and collectives, which only exist under torchrun.
Running it in the notebook checks its syntax and records its text, so that `run_cells`
can tell when the saved notebook differs from what the student last ran (unsaved edits).
"""
from __future__ import annotations

EXECUTED: list[str] = []  # bodies of the %%torchrun cells this kernel has run
LAST_RUN: dict[str, str] = {}  # notebook cell id -> the body this kernel last ran in that cell


def torchrun(line: str, cell: str) -> None:
    compile(cell, "<torchrun cell>", "exec")  # a syntax error shows here, not on every rank later
    EXECUTED.append(cell)
    cell_id = _running_cell_id()
    if cell_id is not None:
        LAST_RUN[cell_id] = cell
    print("[kept for torchrun: run_cells(...) runs this cell on every rank]")


def _running_cell_id() -> str | None:
    """The id of the notebook cell being run, where the frontend sends it (JupyterLab, Notebook 7)."""
    try:
        from IPython import get_ipython

        return get_ipython().kernel.get_parent()["metadata"].get("cellId")
    except (AttributeError, KeyError, TypeError):
        return None


def register(ipython) -> None:
    ipython.register_magic_function(torchrun, magic_kind="cell", magic_name="torchrun")
