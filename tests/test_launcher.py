"""The launcher: extraction, errors, a real 2-rank gloo run, a failing rank, a timeout."""
import json
import os
import subprocess
import sys
import time
import types
import warnings

import nbformat
import pytest

import launcher
from launcher import LaunchError, LaunchTimeout, find_notebook, pick_backend, run_cells
from launcher.extract import build_script, read_tagged_cells
from launcher.run import REPO, _warn_if_unsaved, torchrun_command


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    for source, tags in cells:
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"tags": tags}))
    nb.cells.insert(1, nbformat.v4.new_markdown_cell("prose, tagged like code", metadata={"tags": ["a"]}))
    nbformat.write(nb, str(path))
    return path


@pytest.fixture
def nb(tmp_path):
    return _notebook(tmp_path / "demo.ipynb", [
        ("order = ['first']", ["a"]),
        ("not_me = 1", ["other"]),
        ('%%torchrun\norder.append("second")\ntext = """two\nlines"""', ["b", "a"]),
        ("import torch.distributed as dist\nt = [None] * world_size\n"
         "dist.all_gather_object(t, rank * 10 + X)\nprint('hello from', rank)\n"
         "result = {'order': order, 't': t, 'text': text}",
         ["b"]),
        ("if rank == 1:\n    raise ValueError('rank one is broken')\nimport torch.distributed as dist\ndist.barrier()",
         ["fail"]),
        ("import os, time\nopen(PIDFILE + str(rank), 'w').write(str(os.getpid()))\ntime.sleep(120)", ["hang"]),
        ("%time x = 1", ["magic"]),
        ("%%torchrun\nx = 1\nraise ValueError('broken on every rank')", ["failmagic"]),
        ("from os import *", ["star"]),
    ])


def test_extraction_keeps_notebook_order_and_strips_the_magic(nb):
    cells = read_tagged_cells(nb, ["b", "a"])
    assert [c.number for c in cells] == [1, 4, 5]
    assert cells[1].source.startswith("order.append")
    script = build_script(nb, ["a", "b"], cells, {"X": 3})
    assert script.index("order = ['first']") < script.index("order.append") < script.index("all_gather_object")
    assert "    X = 3" in script and "not_me" not in script and "%%torchrun" not in script
    assert '"""two\nlines"""' in script  # the inside of a multi-line string is not indented
    compile(script, "script.py", "exec")


def test_unknown_tag_lists_the_tags(nb):
    with pytest.raises(ValueError, match=r"no cell tagged \['zzz'\]; its tags are \['a', 'b', 'fail', 'failmagic', "
                                         r"'hang', 'magic', 'other', 'star'\]"):
        read_tagged_cells(nb, ["zzz"])


def test_code_that_cannot_run_under_torchrun_is_refused(nb):
    with pytest.raises(ValueError, match="cell 8 .* cannot run under torchrun: line 1"):
        read_tagged_cells(nb, ["magic"])
    with pytest.raises(ValueError, match="cell 10 .* cannot run under torchrun"):  # fine in a module, not in main()
        read_tagged_cells(nb, ["star"])


def test_params_must_be_json_and_identifiers(nb):
    cells = read_tagged_cells(nb, ["a"])
    with pytest.raises(ValueError, match="identifier"):
        build_script(nb, ["a"], cells, {"not valid": 1})
    with pytest.raises(ValueError, match="JSON"):
        build_script(nb, ["a"], cells, {"X": object()})


def test_two_rank_gloo_run_returns_rank0_value_and_per_rank_logs(nb, capsys):
    res = run_cells(["a", "b"], notebook=nb, nproc=2, backend="gloo", params={"X": 3}, timeout=120)
    assert res.returncode == 0
    assert res.value == {"order": ["first", "second"], "t": [3, 13], "text": "two\nlines"}
    assert "hello from 0" in res.logs[0] and "hello from 1" in res.logs[1]
    out = capsys.readouterr().out
    assert "[rank 0] hello from 0" in out and "[rank 1] hello from 1" in out


def test_a_failing_rank_raises_with_its_last_lines(nb):
    with pytest.raises(LaunchError) as e:
        run_cells("fail", notebook=nb, nproc=2, backend="gloo", stream=False, timeout=120)
    msg = str(e.value)
    assert "rank 1 failed first" in msg and "ValueError: rank one is broken" in msg
    assert "notebook cell 6, line 2" in msg
    with pytest.raises(LaunchError, match=r"notebook cell 9, line 3\)"):  # counted with the %%torchrun line
        run_cells("failmagic", notebook=nb, nproc=2, backend="gloo", stream=False, timeout=120)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to check for orphans")
def test_timeout_kills_every_rank(nb, tmp_path):
    pidfile = str(tmp_path / "pid")
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match="timed out after 20 s"):
        run_cells("hang", notebook=nb, nproc=2, backend="gloo", params={"PIDFILE": pidfile}, timeout=20, stream=False)
    assert time.monotonic() - start < 45
    missing = [r for r in range(2) if not os.path.exists(pidfile + str(r))]
    assert not missing, f"ranks {missing} never started within the timeout; nothing to check"
    pids = [int(open(pidfile + str(r)).read()) for r in range(2)]
    time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "a rank outlived the timeout"


def test_backend_choice():
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        assert pick_backend() == (2, "gloo")
        with pytest.raises(ValueError, match="nccl' needs a GPU per process"):
            pick_backend(2, "nccl")
    assert pick_backend(gpus + 1)[1] == "gloo"
    with pytest.raises(ValueError, match="backend"):
        pick_backend(2, "mpi")
    with pytest.raises(ValueError, match="nproc"):
        pick_backend(0)


def test_torchrun_command_is_standalone_unless_given_a_rendezvous():
    cmd = torchrun_command("py", 2, [], "s.py")
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd
    cmd = torchrun_command("py", 8, ["--nnodes", "2", "--rdzv-endpoint=head:29500"], "s.py")
    assert "--standalone" not in cmd and cmd[-1] == "s.py" and "--rdzv-endpoint=head:29500" in cmd


def test_find_notebook_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_notebook("00_setup_and_launcher.ipynb") == REPO / "notebooks" / "00_setup_and_launcher.ipynb"
    with pytest.raises(FileNotFoundError, match="nope.ipynb"):
        find_notebook("nope.ipynb")
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    with pytest.raises(ValueError, match="notebook="):
        find_notebook()
    monkeypatch.setenv("JPY_SESSION_NAME", str(REPO / "notebooks" / "01_single_device_moe.ipynb"))
    assert find_notebook().name == "01_single_device_moe.ipynb"


def test_unsaved_notebook_warning(nb, monkeypatch):
    cells = read_tagged_cells(nb, ["a"])
    fake = types.SimpleNamespace(user_ns={"_ih": ["", "order = ['first']"]})
    monkeypatch.setattr("IPython.get_ipython", lambda: fake)
    monkeypatch.setattr(launcher.magic, "EXECUTED", ['order.append("second")\ntext = """two\nlines"""'])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        _warn_if_unsaved(cells)  # both cells ran as saved: no warning
    monkeypatch.setattr(launcher.magic, "EXECUTED", ['order.append("an edit that was not saved")'])
    with pytest.warns(UserWarning, match=r"tagged cell\(s\) \[4\] .* save the notebook"):
        _warn_if_unsaved(cells)


def test_unsaved_edit_of_a_cell_that_ran_before_is_caught_by_cell_id(nb, monkeypatch):
    """The usual slip: run the cell as saved, edit it, run it again, launch without saving. The saved text
    is among what the kernel ran, so only the last run of that very cell (by its id) tells."""
    cells = read_tagged_cells(nb, ["a"])
    saved = {c.number: c for c in cells}[4]
    assert saved.cell_id
    edited = 'order.append("an edit that was not saved")'
    fake_kernel = types.SimpleNamespace(get_parent=lambda: {"metadata": {"cellId": saved.cell_id}})
    fake = types.SimpleNamespace(user_ns={"_ih": ["", "order = ['first']"]}, kernel=fake_kernel)
    monkeypatch.setattr("IPython.get_ipython", lambda: fake)
    monkeypatch.setattr(launcher.magic, "EXECUTED", [])
    monkeypatch.setattr(launcher.magic, "LAST_RUN", {})
    launcher.magic.torchrun("", saved.source)
    launcher.magic.torchrun("", edited)  # what the magic records under the running cell's id
    assert launcher.magic.LAST_RUN == {saved.cell_id: edited}
    with pytest.warns(UserWarning, match=r"tagged cell\(s\) \[4\]"):
        _warn_if_unsaved(cells)
    launcher.magic.torchrun("", saved.source)  # back to the saved text: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_unsaved(cells)


def test_command_line(nb, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed launcher, from anywhere
    out = subprocess.run([sys.executable, "-m", "launcher", str(nb), "--tags", "a", "b", "--nproc", "2",
                          "--param", "X=1"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["t"] == [1, 11]
    bad = subprocess.run([sys.executable, "-m", "launcher", str(nb), "--tags", "nope"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert bad.returncode == 1 and "its tags are" in bad.stderr


def test_a_graded_students_notebook_is_found_before_the_courses_copy(tmp_path, monkeypatch):
    student = tmp_path / "00_setup_and_launcher.ipynb"
    student.write_text((REPO / "notebooks" / student.name).read_text())
    monkeypatch.setenv("LAUNCHER_NOTEBOOK_DIR", str(tmp_path))
    assert find_notebook(student.name) == student.resolve()
    monkeypatch.delenv("LAUNCHER_NOTEBOOK_DIR")
    assert find_notebook(student.name) == REPO / "notebooks" / student.name
