"""The exercise checker: the student writes the key piece of a lesson, the library checks it.

In a lesson (every lesson from 01 on ends with a few):

    def split_sizes(expert_ids, num_experts, world_size):   # the student's function
        raise NotImplementedError("...")

    check("03.1", pick("03.1", split_sizes, SOLUTIONS))     # run it on random and edge cases, say what failed
                                                            # (SOLUTIONS=True, a papermill parameter: the library's)
    hint("03.1")                                            # stuck? a hint; last resort:
    solution("03.1")                                        # the library's own solution

`check` compares the student's function with the library's on every case (empty groups, one hot
expert, uneven ranks, …) and prints the first case that fails, with its inputs, the expected value and
what came back. A function that still raises NotImplementedError gets a friendly "not implemented yet",
never a crash, so a notebook runs top to bottom before the student has written anything. For grading
(`python -m lessons_lib.course.checker grade NOTEBOOK` runs a student's notebook and prints the results),
each result is also written to the file named by $EXERCISE_RESULTS, where it is set.
Multi-rank exercises run `run_check` inside a torchrun cell and `report` its result in the notebook.
The exercises themselves, their references and cases, are in `exercises`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .exercises import EXERCISES, collective_device

RESULTS_ENV = "EXERCISE_RESULTS"  # where `report` records each result (unset: nowhere); the grader sets it
RESULTS_FILE = "exercise_results.json"


# ---------------------------------------------------------------- the checking machinery

def _differs(expected, got, where: str = "result") -> str | None:
    """Why `got` is not `expected` (None when it is): shapes, dtypes of ints, values to 1e-5."""
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"{where} should be a {type(expected).__name__} of {len(expected)} items"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = _differs(e, g, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{where} should be a tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{where} has shape {list(got.shape)}, expected {list(expected.shape)}"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            return None if torch.equal(got.to(expected.dtype), expected) else f"{where} has the wrong values"
        ok = torch.allclose(got.float(), expected.float(), rtol=1e-5, atol=1e-6)
        return None if ok else f"{where} differs by up to {(got.float() - expected.float()).abs().max():.3g}"
    if isinstance(expected, int) and not isinstance(expected, bool):  # an int was asked for, not a tensor
        if isinstance(got, bool) or not isinstance(got, int):
            return f"{where} should be a Python int, got {type(got).__name__}"
        return None if got == expected else f"{where} should be {expected!r}"
    if isinstance(expected, float):
        ok = (isinstance(got, (int, float, torch.Tensor))
              and math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-9))
        return None if ok else f"{where} should be {expected:.6g}"
    return None if got == expected else f"{where} should be {expected!r}"


def _short(value, limit: int = 300) -> str:
    if isinstance(value, torch.Tensor):
        text = f"tensor{list(value.shape)} {value.tolist() if value.numel() <= 24 else '…'}"
    elif isinstance(value, (tuple, list)):
        text = "(" + ", ".join(_short(v, 120) for v in value) + ")"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + " …"


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def run_check(key: str, fn: Callable) -> dict:
    """Run `fn` on every case of exercise `key`: {"exercise", "status": passed | failed | not implemented,
    "message"}. Prints nothing; `check` prints, `report` prints a result computed on other ranks.
    A collective exercise runs on every rank, and the ranks agree after each case whether to go on, so
    an answer that is wrong on one rank only stops them all instead of leaving the others waiting."""
    ex = EXERCISES[key]
    cases = ex.cases()
    for name, args in cases:
        expected = ex.reference(*_clone(args))
        result = _one_case(key, fn, name, args, expected)
        if ex.collective:
            result = _agree(key, name, result)
        if result is not None:
            return result
    return {"exercise": key, "status": "passed", "message": f"all {len(cases)} cases pass"}


def _one_case(key, fn, name, args, expected) -> dict | None:
    try:
        got = fn(*_clone(args))
    except NotImplementedError:
        return {"exercise": key, "status": "not implemented",
                "message": f"not implemented yet: write it, run this cell again (stuck? hint({key!r}))"}
    except Exception as e:  # the student's code broke: say where, do not stop the notebook
        return {"exercise": key, "status": "failed",
                "message": f"case {name!r} raised {type(e).__name__}: {e}\n  inputs:   {_short(args)}"}
    problem = _differs(expected, got)
    if problem:
        return {"exercise": key, "status": "failed",
                "message": f"case {name!r}: {problem}\n  inputs:   {_short(args)}\n"
                           f"  expected: {_short(expected)}\n  got:      {_short(got)}"}
    return None


def _agree(key, name, result: dict | None) -> dict | None:
    """Every rank learns the worst outcome of this case (0 passed, 1 failed, 2 not implemented)."""
    code = {None: 0, "failed": 1, "not implemented": 2}[result and result["status"]]
    flags = torch.tensor([code], device=collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags.item() == 0:
        return None
    if result is not None:
        return result
    status = "not implemented" if flags.item() == 2 else "failed"
    return {"exercise": key, "status": status, "message": f"case {name!r} failed on another rank (this one was right)"}


def report(result: dict) -> bool:
    """Print a check's result, record it in the file $EXERCISE_RESULTS names (if set), return whether it passed."""
    key = result["exercise"]
    mark = {"passed": "✓", "failed": "✗", "not implemented": "…"}[result["status"]]
    print(f"{mark} exercise {key}, {EXERCISES[key].title}: {result['message']}")
    if not os.environ.get(RESULTS_ENV):
        return result["status"] == "passed"
    path = Path(os.environ[RESULTS_ENV])
    try:
        results = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        results = {}
    results[key] = {"status": result["status"], "message": result["message"]}
    path.write_text(json.dumps(results, indent=1, sort_keys=True))
    return result["status"] == "passed"


def check(key: str, fn: Callable) -> bool:
    """Check the student's `fn` for exercise `key` against the library's solution; print and record."""
    if key not in EXERCISES:
        raise KeyError(f"no exercise {key!r}; the exercises are {sorted(EXERCISES)}")
    return report(run_check(key, fn))


def hint(key: str) -> None:
    print(f"hint for {key}, {EXERCISES[key].title}: {EXERCISES[key].hint}")


def solution(key: str) -> None:
    """Show the library's solution of exercise `key` (its source)."""
    from ..lab.figures import show_source

    show_source(EXERCISES[key].reference)


def pick(key: str, fn: Callable, solutions: bool) -> Callable:
    """The function to check: the student's, or with `solutions` (the notebooks' SOLUTIONS parameter,
    which CI sets both ways) the library's."""
    return EXERCISES[key].reference if solutions else fn


def main(argv=None) -> int:
    """python -m lessons_lib.course.checker grade NOTEBOOK [--solutions]: run a student's notebook with papermill
    in a fresh folder and print the result of each exercise it checks; `list` lists the exercises."""
    import argparse
    import subprocess
    import sys
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m lessons_lib.course.checker", description=main.__doc__)
    ap.add_argument("command", choices=["grade", "list"])
    ap.add_argument("notebook", nargs="?")
    ap.add_argument("--solutions", action="store_true", help="run with the library's solutions (a dry run)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds the notebook may take")
    args = ap.parse_args(argv)
    if args.command == "list":
        for key, ex in EXERCISES.items():
            print(f"{key}  {ex.title}")
        return 0
    if not args.notebook:
        ap.error("grade needs a notebook")
    notebook = Path(args.notebook).expanduser().resolve()
    if not notebook.is_file():
        print(f"grade: no notebook at {notebook}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results_path = Path(tmp) / RESULTS_FILE
        # The student's own tagged cells, not the course's copy of the lesson: the launcher looks in its folder first.
        env = dict(os.environ, **{RESULTS_ENV: str(results_path)}, LAUNCHER_NOTEBOOK_DIR=str(notebook.parent),
                   MOE_COURSE_HEADLESS="1")
        cmd = [sys.executable, "-m", "papermill", str(notebook), str(Path(tmp) / notebook.name), "--cwd", tmp,
               "-k", "python3", "-p", "SOLUTIONS", str(args.solutions), "--no-progress-bar"]
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    print(f"{notebook.name}: " + ("ran to the end" if run.returncode == 0 else "stopped with an error:"))
    if run.returncode != 0:
        print("\n".join("    " + line for line in run.stderr.strip().splitlines()[-12:]))
    for key in sorted(results):
        print(f"  {key:5s} {results[key]['status']:16s} {EXERCISES[key].title}")
    print(json.dumps({"notebook": notebook.name, "ran": run.returncode == 0, "results": results}))
    return 0 if run.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
