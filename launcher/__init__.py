"""The course launcher: runs a notebook's tagged cells on several ranks under torchrun.

    from launcher import run_cells
    result = run_cells("allreduce", notebook="00_setup_and_launcher.ipynb", nproc=2)
    result.value  # what rank 0 put in `result`

Importing it in a notebook also registers the `%%torchrun` cell magic.
"""
from .run import LaunchError, LaunchResult, LaunchTimeout, find_notebook, pick_backend, run_cells, run_script

__all__ = ["LaunchError", "LaunchResult", "LaunchTimeout", "find_notebook", "pick_backend", "run_cells", "run_script"]


def load_ipython_extension(ipython) -> None:
    from .magic import register

    register(ipython)


try:  # inside IPython/Jupyter: make %%torchrun available on import
    from IPython import get_ipython as _get_ipython

    if _get_ipython() is not None:
        load_ipython_extension(_get_ipython())
except ImportError:
    pass
