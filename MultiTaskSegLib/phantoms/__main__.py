"""Write phantom cases: ``python -m MultiTaskSegLib.phantoms OUT_DIR [--cases N] [--seed S] [--size small|full]``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from . import PHANTOM_TASKS, SIZES, write_phantoms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MultiTaskSegLib.phantoms", description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write TASK/case_NNN/image.nii.gz and label.nii.gz into")
    parser.add_argument("--cases", type=int, default=3, help="cases per task (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="case i of a task depends only on seed, task and i")
    parser.add_argument("--size", choices=SIZES, default="small", help="small: at most 64 voxels a side")
    parser.add_argument("--tasks", nargs="+", default=list(PHANTOM_TASKS), help="tasks to write (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace case files already in out_dir")
    arguments = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        folders = write_phantoms(arguments.out_dir, arguments.cases, arguments.seed, arguments.size, arguments.tasks,
                                 overwrite=arguments.overwrite)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(folders)} cases under {arguments.out_dir} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
