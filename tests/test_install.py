"""The course installs like a library (pip install -e ., as `make install` does): it imports, and its lessons
execute, from any working directory with no PYTHONPATH."""
import json
import os
import subprocess
import sys

import pytest

from launcher.run import NOTEBOOKS


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


def test_the_packages_import_from_another_directory(tmp_path):
    code = ("import lessons_lib, launcher, lessons_lib.lab.bench, lessons_lib.course.checker; "
            "print(lessons_lib.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(os.path.join("lessons_lib", "__init__.py"))


@pytest.mark.parametrize("lesson, params", [("00_setup_and_launcher", []),
                                            ("03_ep_alltoall", ["-p", "TIMED_STEPS", "5", "-p", "SOLUTIONS", "True"])])
def test_papermill_runs_a_lesson_from_a_temporary_directory_without_pythonpath(lesson, params, tmp_path):
    """As a new user types it: plain papermill from a folder of their own (not via the course's runner)."""
    src = NOTEBOOKS / f"{lesson}.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(src), "out.ipynb", "-k", "python3",
                           "--no-progress-bar", *params], cwd=tmp_path, env=_clean_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.ipynb"], "a hand run leaves nothing else behind"


def test_nbconvert_executes_a_lesson_from_a_temporary_directory_without_pythonpath(tmp_path):
    src = tmp_path / "00_setup_and_launcher.ipynb"
    src.write_text((NOTEBOOKS / src.name).read_text())  # a copy, as a student keeps one of their own
    proc = subprocess.run([sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", "--output", "out.ipynb",
                           str(src)], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    assert not [o for c in cells for o in c.get("outputs", []) if o["output_type"] == "error"]
