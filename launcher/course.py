"""Run the whole course: every notebook in order, with papermill, then an HTML copy of each.

    python -m launcher.course [--out build/course] [--only 01] [-p NAME VALUE ...]

Executed notebooks and HTML land in the build folder (ignored by git); the source
notebooks stay without outputs. A failed assertion in a notebook stops the run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from .run import NOTEBOOKS, REPO, _kill_tree


def course_notebooks(only: list[str] | None = None) -> list[Path]:
    """The lessons in order: notebooks/NN_*.ipynb, optionally only those whose name starts with one of `only`."""
    found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        found = [p for p in found if any(p.name.startswith(o) for o in only)]
    return found


def _call(cmd: list[str], timeout: float, cwd: Path) -> None:
    env = dict(os.environ)  # the course is installed (pip install -e .): no PYTHONPATH needed
    env["MOE_COURSE_HEADLESS"] = "1"  # no frontend: lessons skip widgets (see lessons_lib.lab.figures.running_headless)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)  # papermill, its kernel and any torchrun ranks the notebook started
        raise TimeoutError(f"{' '.join(cmd[:4])} ... took more than {timeout:g} s and was killed") from None
    except KeyboardInterrupt:
        _kill_tree(proc)
        raise
    if rc != 0:
        raise RuntimeError(f"command failed with status {rc}: {' '.join(cmd)}")


def exercise_part(notebook: Path):
    """The cells a run of a lesson's exercises needs: its introduction, parameters and set-up (every cell before the
    first "## " section) and its exercises (from the markdown cell with the "## Exercises" heading on). The
    measurements in between do not change with `SOLUTIONS`, so a run that checks the solutions can leave them out."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    sections = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## ")]
    exercises = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                 and any(line.startswith("## Exercises") for line in c.source.splitlines())]
    if not sections or not exercises or exercises[0] <= sections[0]:
        raise ValueError(f"{notebook.name} needs a '## ' section after its set-up and, after that, an '## Exercises' "
                         "heading")
    nb.cells = nb.cells[:sections[0]] + nb.cells[exercises[0]:]
    return nb


def execute_notebook(notebook: Path, out_dir: Path, parameters: dict | None = None,
                     timeout: float = 900, html: bool = True, exercises_only: bool = False) -> Path:
    """Execute `notebook` with papermill into `out_dir` (also its working directory) and,
    with `html`, render it. Returns the executed notebook's path. exercises_only: run its `exercise_part` alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / notebook.name
    if exercises_only:
        import nbformat

        source = out_dir / f"{notebook.stem}.exercises.ipynb"
        nbformat.write(exercise_part(notebook), str(source))
        notebook = source
    cmd = [sys.executable, "-m", "papermill", str(notebook), str(out), "--cwd", str(out_dir),
           "-k", "python3", "--no-progress-bar", "--log-output"]
    for name, value in (parameters or {}).items():
        cmd += ["-p", name, str(value)]
    _call(cmd, timeout, cwd=out_dir)
    if html:
        _call([sys.executable, "-m", "nbconvert", "--to", "html", "--log-level", "WARN", str(out)],
              timeout=120, cwd=out_dir)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher.course", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "build" / "course"), help="where executed notebooks go")
    ap.add_argument("--only", nargs="*", help="lesson numbers to run, e.g. --only 00 01")
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a papermill parameter for every notebook that has it, e.g. -p STEPS 1000")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per notebook")
    ap.add_argument("--no-html", action="store_true", help="skip the HTML rendering (needs no nbconvert)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out).resolve()
    notebooks = course_notebooks(args.only)
    if not notebooks:
        print(f"no notebook matches {args.only} in {NOTEBOOKS}", file=sys.stderr)
        return 1
    for nb in notebooks:
        t0 = time.monotonic()
        print(f"== {nb.name}", flush=True)
        execute_notebook(nb, out_dir, dict(args.param), timeout=args.timeout, html=not args.no_html)
        print(f"   done in {time.monotonic() - t0:.0f} s", flush=True)
    print(f"\nExecuted notebooks{'' if args.no_html else ' and their HTML'} are in {out_dir}:")
    for nb in notebooks:
        print(f"  {out_dir / nb.name}" + ("" if args.no_html else f"\n  {out_dir / nb.with_suffix('.html').name}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
