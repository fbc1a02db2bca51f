"""python -m launcher NOTEBOOK --tags T [T ...] --nproc N [torchrun arguments ...]

Arguments the launcher does not know are passed to torchrun, e.g. a class cluster:
    python -m launcher notebooks/00_setup_and_launcher.ipynb --tags allreduce --nproc 8 \\
        --nnodes 2 --node-rank 0 --rdzv-backend c10d --rdzv-endpoint head-node:29500
"""
import argparse
import json
import sys

from .run import LaunchError, run_cells


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launcher", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebook")
    ap.add_argument("--tags", nargs="+", required=True, help="run the cells carrying any of these tags")
    ap.add_argument("--nproc", type=int, default=None, help="processes per node (default: GPUs, or 2)")
    ap.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    ap.add_argument("--timeout", type=float, default=600, help="seconds before every rank is killed")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                    help="a variable for the cells, e.g. --param TOKENS=64")
    args, torchrun_args = ap.parse_known_args(argv)
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value  # a bare word is a string
    try:
        res = run_cells(args.tags, notebook=args.notebook, nproc=args.nproc, backend=args.backend,
                        params=params, timeout=args.timeout, torchrun_args=torchrun_args)
    except (LaunchError, ValueError, FileNotFoundError) as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 1
    if res.value is not None:
        print(json.dumps(res.value))
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
