"""Turn a notebook's tagged cells into a script that torchrun can run on every rank.

A cell joins the script when it carries one of the requested tags (JupyterLab: the
property inspector, "Cell Tags"). Cells are kept in notebook order and become the
body of a small generated `main`; a cell may start with `%%torchrun`, the magic that
keeps it from running in the notebook's own kernel.
"""
from __future__ import annotations

import io
import json
import keyword
import tokenize
from dataclasses import dataclass
from pathlib import Path

MAGIC = "%%torchrun"


@dataclass
class TaggedCell:
    number: int  # position among all cells of the notebook, counting from 1
    tags: list[str]
    source: str  # without the %%torchrun line
    first_line: int = 1  # the line of the cell that `source` starts at (2 after a %%torchrun line)
    cell_id: str | None = None  # nbformat's cell id, which JupyterLab also sends with each execution


def cell_body(source: str) -> str:
    """The cell's code without a leading `%%torchrun` line."""
    first, _, rest = source.partition("\n")
    return rest if first.strip().startswith(MAGIC) else source


def read_tagged_cells(notebook: str | Path, tags: list[str]) -> list[TaggedCell]:
    """The code cells carrying any of `tags`, in notebook order.

    Raises ValueError for a tag no cell carries (listing the tags the notebook has),
    and for a tagged cell that is not plain Python (IPython magics cannot run under torchrun).
    """
    import nbformat  # here, so that run_script works where nbformat is not installed

    nb = nbformat.read(str(notebook), as_version=4)
    wanted = set(tags)
    present = sorted({t for c in nb.cells for t in c.get("metadata", {}).get("tags", [])})
    unknown = sorted(wanted - set(present))
    if unknown:
        raise ValueError(f"{Path(notebook).name} has no cell tagged {unknown}; its tags are {present}")
    cells = []
    for i, c in enumerate(nb.cells):
        cell_tags = c.get("metadata", {}).get("tags", [])
        if c.cell_type != "code" or not wanted & set(cell_tags):
            continue
        body = cell_body(c.source)
        first_line = 1 if body == c.source else 2
        try:  # as the body of a function, which is where it will run
            compile("def main():\n" + (indent(body) if body.strip() else "    pass"), f"<cell {i + 1}>", "exec")
        except SyntaxError as e:
            line = (e.lineno or 2) - 2 + first_line
            raise ValueError(
                f"{Path(notebook).name} cell {i + 1} (tags {cell_tags}) cannot run under torchrun: "
                f"line {line}: {e.msg} ({(e.text or '').strip()!r}); IPython magics and `import *` are not allowed"
            ) from None
        except (tokenize.TokenError, IndentationError) as e:
            raise ValueError(f"{Path(notebook).name} cell {i + 1} (tags {cell_tags}) is not plain Python: "
                             f"{e}") from None
        cells.append(TaggedCell(i + 1, cell_tags, body, first_line, c.get("id")))
    return cells


def _lines_inside_strings(source: str) -> set[int]:
    """0-based numbers of lines that begin inside a multi-line string literal.

    Those lines must not be indented: the spaces would become part of the string."""
    inside: set[int] = set()
    fstring_start = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+ tokenizes f-strings
    open_fstrings = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == fstring_start:
            open_fstrings.append(tok.start[0])
        elif fstring_start is not None and tok.type == tokenize.FSTRING_END:
            start = open_fstrings.pop()
            inside.update(range(start, tok.end[0]))
        elif tok.type == tokenize.STRING:
            inside.update(range(tok.start[0], tok.end[0]))
    return inside


def indent(source: str, prefix: str = "    ") -> str:
    keep = _lines_inside_strings(source)
    lines = source.splitlines()
    return "\n".join(
        line if i in keep or not line.strip() else prefix + line for i, line in enumerate(lines)
    )


def check_params(params: dict | None) -> dict:
    """Parameters become assignments at the top of `main`: names must be identifiers, values JSON."""
    params = dict(params or {})
    for name, value in params.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"parameter name {name!r} is not a Python identifier")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise ValueError(
                f"parameter {name}={value!r} is not plain JSON data (numbers, strings, bools, None, lists, dicts)"
            ) from None
    return params


def build_script(notebook: str | Path, tags: list[str], cells: list[TaggedCell], params: dict | None = None) -> str:
    """The script torchrun runs: the tagged cells, in order, inside a generated `main`."""
    out = [
        f"# Generated by the course launcher from {Path(notebook).name}, tags {list(tags)}.",
        "# torchrun runs one copy per rank. Edit the notebook, not this file.",
        "from launcher import runtime",
        "",
        "",
        "def main():",
        "    # init_process_group; device is cuda:LOCAL_RANK under nccl, cpu under gloo",
        "    rank, world_size, device = runtime.setup()",
        "    result = None  # rank 0's result (JSON data) goes back to the notebook",
    ]
    for name, value in check_params(params).items():
        out.append(f"    {name} = {value!r}")
    for cell in cells:
        out += ["", f"    # ---- notebook cell {cell.number}, tags {cell.tags}, from line {cell.first_line} ----"]
        body = indent(cell.source)
        out.append(body if body.strip() else "    pass")
    out += ["", "    runtime.finish(result)", "", "", 'if __name__ == "__main__":', "    runtime.run(main)", ""]
    return "\n".join(out)
