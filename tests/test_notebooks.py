"""Every lesson runs top to bottom under papermill, from a directory that is not notebooks/."""
import json

import nbformat
import pytest

from launcher.course import course_notebooks, execute_notebook

NOTEBOOKS = course_notebooks()
TIME_LIMIT_S = 300  # per notebook, on the 2-core CI machine


def test_the_course_has_its_lessons_in_order():
    names = [p.name[:2] for p in NOTEBOOKS]
    assert names[:2] == ["00", "01"] and names == sorted(names)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    dirty = [i + 1 for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{notebook.name}: cells {dirty} carry outputs; clear them before committing"
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "a papermill parameters cell"


def _has_exercises(notebook) -> bool:
    return notebook.name[:2] != "00"


RUNS = [(nb, False) for nb in NOTEBOOKS] + [(nb, True) for nb in NOTEBOOKS if _has_exercises(nb)]


@pytest.mark.parametrize("notebook, solutions", RUNS,
                         ids=[f"{nb.stem}-{'solutions' if sol else 'student'}" for nb, sol in RUNS])
def test_notebook_executes(notebook, solutions, tmp_path, monkeypatch):
    """Both ways: as a student gets it, whole (exercises not written: each check says so, nothing crashes), and
    with the library's solutions (every check passes): its set-up and exercises alone, since nothing else in a
    lesson depends on `SOLUTIONS` (`launcher.course.exercise_part`)."""
    # a hung multi-rank cell then fails with its ranks' last lines, before the notebook's own limit
    monkeypatch.setenv("LAUNCHER_TIMEOUT", str(TIME_LIMIT_S // 2))
    run = tmp_path / "run"
    monkeypatch.setenv("EXERCISE_RESULTS", str(run / "exercise_results.json"))  # as the grader does
    out = execute_notebook(notebook, run, {"SOLUTIONS": solutions} if _has_exercises(notebook) else {},
                           timeout=TIME_LIMIT_S, html=not solutions, exercises_only=solutions)
    assert out.with_suffix(".html").is_file() == (not solutions)
    nb = nbformat.read(str(out), as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    # stderr shows as a red block: progress bars, warnings and tracebacks do not belong in a lesson's output
    stderr = [o.text[:300] for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, stderr
    # a widget cannot render headless, and nbclient can hang on one: lessons print a static result instead
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    if _has_exercises(notebook):
        results = json.loads((run / "exercise_results.json").read_text())
        assert results and {r["status"] for r in results.values()} == {"passed" if solutions else "not implemented"}


def test_the_solutions_run_keeps_the_set_up_and_the_exercises():
    """Only the cells between the set-up and the exercises may be left out of the solutions run, and none of them
    may read SOLUTIONS (else leaving them out would change what the run checks). That the exercises need nothing
    those cells define, the solutions run itself shows (a NameError fails it)."""
    from launcher.course import exercise_part

    for notebook in [nb for nb in NOTEBOOKS if _has_exercises(nb)]:
        whole = nbformat.read(str(notebook), as_version=4).cells
        kept = exercise_part(notebook).cells
        assert any("parameters" in c.metadata.get("tags", []) for c in kept), notebook.name
        assert any("from lessons_lib.course.checker import" in c.source for c in kept), notebook.name
        head = next(i for i, (a, b) in enumerate(zip(kept, whole)) if a != b)  # the set-up: the same first cells
        tail = len(kept) - head  # and the exercises: the same last cells
        assert kept == whole[:head] + whole[-tail:] and head + tail < len(whole), notebook.name
        assert not [c for c in whole[head:-tail] if "SOLUTIONS" in c.source], notebook.name


def test_a_failing_assertion_fails_the_run(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("assert x == 2, 'the claim does not hold'")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(RuntimeError, match="failed"):
        execute_notebook(path, tmp_path / "run", timeout=120, html=False)


def test_headless_runs_are_recognised(tmp_path, monkeypatch):
    from lessons_lib.lab.figures import HEADLESS_ENV, running_headless, widgets_available

    monkeypatch.setenv(HEADLESS_ENV, "1")
    assert running_headless() and not widgets_available()
    monkeypatch.setenv(HEADLESS_ENV, "0")
    assert not running_headless()  # pytest's parent is a shell, not a notebook runner
    # papermill started by hand, with no variable set: the kernel sees papermill as its parent
    monkeypatch.delenv(HEADLESS_ENV)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from lessons_lib.lab.figures import running_headless\n"
                                          "assert running_headless(), 'papermill is the parent'")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src, out = tmp_path / "probe.ipynb", tmp_path / "probe_out.ipynb"
    nbformat.write(nb, str(src))
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in (HEADLESS_ENV, "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-m", "papermill", str(src), str(out), "-k", "python3",
                           "--no-progress-bar"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("notebook", [nb for nb in NOTEBOOKS if _has_exercises(nb)], ids=lambda p: p.stem)
def test_a_lesson_gives_its_student_hint_and_solution(notebook):
    """Each lesson's exercises say: stuck? hint("NN.1"); last resort, solution("NN.1"). Both must be defined."""
    nb = nbformat.read(str(notebook), as_version=4)
    imports = [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines()
               if line.startswith("from lessons_lib.course.checker import")]
    assert any({"check", "hint", "solution"} <= set(line.replace(",", " ").split()) for line in imports), imports
