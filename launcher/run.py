"""Run tagged notebook cells under torchrun and bring the result back to the notebook."""
from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import magic
from .extract import build_script, check_params, read_tagged_cells

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
_RANK_PREFIX = re.compile(r"^\[rank (\d+)\] ?")
# torchrun's flags that set up its own rendezvous; with any of them we drop --standalone.
_RDZV_FLAGS = ("--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr")


class LaunchError(RuntimeError):
    """A rank failed; the message holds the failing rank's last lines."""


class LaunchTimeout(LaunchError):
    """The run took longer than `timeout`; every process it started has been killed."""


@dataclass
class LaunchResult:
    returncode: int
    value: object  # the JSON data rank 0 left in `result` (None if it left nothing)
    logs: dict = field(repr=False)  # rank -> list of output lines; "torchrun" for the rest
    script: str = field(repr=False)  # the generated script, to read
    command: list = field(repr=False)
    seconds: float = 0.0


def pick_backend(nproc: int | None = None, backend: str | None = None) -> tuple[int, str]:
    """(nproc, backend): nproc defaults to the GPU count, or 2 without GPUs; the backend
    is nccl when there is a GPU for every process, gloo otherwise."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nproc = nproc if nproc is not None else (gpus or 2)
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    backend = backend or ("nccl" if gpus >= nproc else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and gpus < nproc:
        raise ValueError(f"backend 'nccl' needs a GPU per process: nproc={nproc}, but {gpus} GPU(s) are visible")
    return nproc, backend


def find_notebook(notebook: str | os.PathLike | None = None) -> Path:
    """The notebook file whose cells to run.

    A bare file name is looked up in $LAUNCHER_NOTEBOOK_DIR first (the grader sets it to a student's folder),
    then in the course's notebooks/ folder, then in the current directory, so `notebook="01_single_device_moe.ipynb"`
    works from any working directory (papermill, a test, a shell); a path with folders is taken relative to the
    current directory. Without one, the path is asked of the editor (VS Code's __vsc_ipynb_file__, Jupyter's
    JPY_SESSION_NAME).
    """
    tried = []
    if notebook is not None:
        p = Path(notebook).expanduser()
        if p.is_absolute():
            candidates = [p]
        elif p.parent == Path("."):  # a bare name: the course's own notebook before the working directory's
            # (papermill's working directory holds the executed copy under the same name)
            first = [Path(os.environ["LAUNCHER_NOTEBOOK_DIR"]) / p] if os.environ.get("LAUNCHER_NOTEBOOK_DIR") else []
            candidates = [*first, NOTEBOOKS / p, p]
        else:
            candidates = [p, NOTEBOOKS / p]
    else:
        candidates = []
        try:
            from IPython import get_ipython

            ip = get_ipython()
            if ip is not None and ip.user_ns.get("__vsc_ipynb_file__"):
                candidates.append(Path(ip.user_ns["__vsc_ipynb_file__"]))
        except ImportError:
            pass
        session = os.environ.get("JPY_SESSION_NAME")
        if session:
            candidates += [Path(session), Path.cwd() / Path(session).name]
        if not candidates:
            raise ValueError("cannot tell which notebook is running here: pass notebook='NAME.ipynb'")
    for c in candidates:
        tried.append(str(c))
        if c.is_file():
            return c.resolve()
    raise FileNotFoundError(f"notebook not found; tried {tried}")


def _warn_if_unsaved(cells) -> None:
    """Inside a kernel: warn about tagged cells whose saved text differs from what this kernel last ran in
    that cell (where the frontend sends cell ids), or, without ids, that this kernel never ran."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    ran = {s.strip() for s in magic.EXECUTED} | {s.strip() for s in ip.user_ns.get("_ih", [])}

    def is_stale(c) -> bool:
        if c.cell_id in magic.LAST_RUN:  # edited, run, not saved: the saved text may still be in `ran`
            return magic.LAST_RUN[c.cell_id].strip() != c.source.strip()
        return c.source.strip() not in ran

    stale = [c.number for c in cells if is_stale(c)]
    if stale:
        warnings.warn(
            f"tagged cell(s) {stale} of the saved notebook differ from what this kernel last ran: "
            "torchrun runs the saved file, so save the notebook (Ctrl+S) if you edited them",
            stacklevel=3,
        )


def _parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process: from /proc on Linux, else from `ps`."""
    parents = {}
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass  # the process ended while we looked
        return parents
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True).stdout
    except OSError:
        return parents
    for line in out.splitlines():
        p, pp = map(int, line.split())
        parents[p] = pp
    return parents


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p, pp in _parent_pids().items():
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """End torchrun and every rank. Ranks run in sessions of their own, so the process group
    of torchrun alone would miss them: collect the whole tree first."""
    pids = [proc.pid] + _descendants(proc.pid)
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.poll()  # reap torchrun if it is done, so it does not count as alive
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
            proc.poll()
        if not any(_alive(p) for p in pids):
            break
    proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def torchrun_command(python: str, nproc: int, torchrun_args, script) -> list[str]:
    """`--standalone` (a private rendezvous on a free port, so students sharing a machine never
    collide) unless the extra arguments bring a rendezvous of their own, as on a multi-node cluster."""
    extra = [str(a) for a in torchrun_args]
    standalone = [] if any(a.split("=")[0] in _RDZV_FLAGS for a in extra) else ["--standalone"]
    return [python, "-m", "torch.distributed.run", *standalone, f"--nproc-per-node={nproc}", *extra, str(script)]


def run_cells(tags, notebook=None, nproc: int | None = None, backend: str | None = None,
              params: dict | None = None, timeout: float | None = None, torchrun_args=(), stream: bool = True,
              python: str = sys.executable) -> LaunchResult:
    """Run the cells of `notebook` tagged with `tags` on `nproc` ranks under torchrun.

    params: values the cells need from the notebook (e.g. its papermill parameters);
        each becomes a variable of the script. The cells also see `rank`, `world_size`, `device`.
    Returns a LaunchResult; its `value` is whatever rank 0 assigned to `result`.
    Raises LaunchError (with the failing rank's last lines) if a rank fails, and
    LaunchTimeout after `timeout` seconds (default: $LAUNCHER_TIMEOUT, else 600), having killed every
    process it started.
    """
    tags = [tags] if isinstance(tags, str) else list(tags)
    path = find_notebook(notebook)
    cells = read_tagged_cells(path, tags)
    _warn_if_unsaved(cells)
    nproc, backend = pick_backend(nproc, backend)
    script = build_script(path, tags, cells, params)
    return _launch(script, path.parent, nproc, backend, {}, timeout, torchrun_args, stream, python)


def run_script(path, nproc: int | None = None, backend: str | None = None, params: dict | None = None,
               timeout: float | None = None, torchrun_args=(), stream: bool = True,
               python: str = sys.executable) -> LaunchResult:
    """Run a Python file under torchrun the way `run_cells` runs cells. The file calls
    `launcher.runtime.run(main)`, where main calls `runtime.setup()` and `runtime.finish(result)`;
    `runtime.params()` returns `params`."""
    path = Path(path).resolve()
    nproc, backend = pick_backend(nproc, backend)
    env = {"LAUNCHER_PARAMS": json.dumps(check_params(params))}
    return _launch(path.read_text(), path.parent, nproc, backend, env, timeout, torchrun_args, stream, python)


def _launch(script, search_path, nproc, backend, extra_env, timeout, torchrun_args, stream, python) -> LaunchResult:
    if timeout is None:
        timeout = float(os.environ.get("LAUNCHER_TIMEOUT", 600))
    run_dir = Path(tempfile.mkdtemp(prefix="launcher-"))
    try:
        (run_dir / "script.py").write_text(script)
        env = dict(os.environ)
        # The course is installed (pip install -e .); the script's own folder is importable beside it, as it would
        # be for a script run where it lies (run_script's tests/ep_worker.py).
        env["PYTHONPATH"] = os.pathsep.join([str(search_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env.update(PYTHONUNBUFFERED="1", LAUNCHER_BACKEND=backend, LAUNCHER_RUN_DIR=str(run_dir),
                   LAUNCHER_RESULT=str(run_dir / "result.json"), **extra_env)
        # torchrun would set 1 thread per rank and print a warning about it; share the cores instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        command = torchrun_command(python, nproc, torchrun_args, run_dir / "script.py")
        returncode, logs, seconds = _run(command, env, timeout, stream)
        # First failure first: the others are often a consequence (a peer gone mid-collective).
        markers = sorted(run_dir.glob("failed-rank*"), key=lambda p: p.stat().st_mtime)
        failed = [int(p.name.removeprefix("failed-rank")) for p in markers]
        if returncode != 0:
            raise LaunchError(_point_at_cells(_failure_message(returncode, failed, logs), script))
        result_file = run_dir / "result.json"
        value = json.loads(result_file.read_text()) if result_file.exists() else None
        return LaunchResult(returncode, value, logs, script, command, seconds)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _run(command, env, timeout, stream):
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True, stdin=subprocess.DEVNULL)
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    logs: dict = {}
    quiet = False  # torchrun's own report of a failed rank is long; it stays in logs["torchrun"]
    start = time.monotonic()
    try:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                _kill_tree(proc)
                tail = "\n".join(_tail_all(logs, 10))
                raise LaunchTimeout(f"timed out after {timeout:g} s; every rank was killed. Last lines:\n{tail}")
            try:
                line = lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if line is None:
                break
            m = _RANK_PREFIX.match(line)
            key = int(m.group(1)) if m else "torchrun"
            logs.setdefault(key, []).append(line[m.end():] if m else line)
            quiet = quiet or (not m and "failed (exitcode" in line)
            if stream and (m or not quiet):
                print(line, flush=True)
    except KeyboardInterrupt:  # the notebook's stop button: leave no rank behind
        _kill_tree(proc)
        raise
    return proc.wait(), logs, time.monotonic() - start


def _point_at_cells(message: str, script: str) -> str:
    """Add the notebook cell and line to each traceback line that points into the script."""
    starts = [(i + 1, int(m.group(1)), int(m.group(2))) for i, line in enumerate(script.splitlines())
              if (m := re.match(r"\s*# ---- notebook cell (\d+), .*from line (\d+) ----", line))]

    def where(m):
        line = int(m.group(1))
        cell = [s for s in starts if s[0] < line]
        if not cell:
            return m.group(0)
        start, number, first_line = cell[-1]
        return f"{m.group(0)} (notebook cell {number}, line {line - start - 1 + first_line})"

    return re.sub(r'script\.py", line (\d+)', where, message)


def _tail_all(logs, n):
    return [f"[{k}] {line}" for k, v in logs.items() for line in v[-n:]]


def _failure_message(returncode, failed, logs) -> str:
    if failed:
        r = failed[0]
        tail = "\n".join(logs.get(r, [])[-15:])
        return f"rank {r} failed first (failed ranks: {failed}); its last lines:\n{tail}"
    tail = "\n".join(_tail_all(logs, 15))
    return f"torchrun exited with status {returncode}; last lines:\n{tail}"
