"""Show the course's committed figures (images/) and the library's source in a notebook (lesson 01 on).

Markdown links like ../images/x.png break once a notebook is executed elsewhere
(papermill, the HTML build), so lessons display figures through this instead.
"""
from __future__ import annotations

from pathlib import Path

IMAGES = Path(__file__).resolve().parents[2] / "images"  # the repository's images/ (an editable install)


def show_image(name: str, width: int | None = None):
    """Display images/NAME in the notebook (regenerate diagrams with images/make_diagrams.py)."""
    from IPython.display import Image, display

    path = IMAGES / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `python images/make_diagrams.py`")
    display(Image(filename=str(path), width=width))


def show_source(obj) -> None:
    """Display the source code of a library function or class in the notebook."""
    import inspect

    from IPython.display import Markdown, display

    display(Markdown(f"`{obj.__module__}.{obj.__qualname__}`\n```python\n{inspect.getsource(obj)}```"))


HEADLESS_ENV = "MOE_COURSE_HEADLESS"


def running_headless() -> bool:
    """True when the notebook runs with no frontend to draw widgets: under `launcher.course` / the tests
    (they set MOE_COURSE_HEADLESS=1), or under papermill or nbconvert started by hand (seen in the kernel's
    parent process on Linux). There a widget cannot render, and nbclient can wait forever on its comm
    messages (nteract/papermill#723), which is how an unattended run of lesson 07 once hung."""
    import os

    if os.environ.get(HEADLESS_ENV, "") not in ("", "0"):
        return True
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = f.read().decode(errors="replace")
    except OSError:
        return False
    return any(tool in parent for tool in ("papermill", "nbconvert", "nbclient"))


def widgets_available() -> bool:
    """Whether to draw ipywidgets (lesson 07's sliders, a progress bar): a live notebook with ipywidgets installed."""
    import importlib.util

    return not running_headless() and importlib.util.find_spec("ipywidgets") is not None
