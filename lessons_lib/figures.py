"""Show the course's committed figures (images/) from any working directory.

Markdown links like ../images/x.png break once a notebook is executed elsewhere
(papermill, the HTML build), so lessons display figures through this instead.
"""
from __future__ import annotations

from pathlib import Path

IMAGES = Path(__file__).resolve().parent.parent / "images"


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
