"""Segment many scans in 3D Slicer without a window, with the MultiTaskSeg module's logic.

    Slicer --no-main-window --python-script scripts/batch_in_slicer.py -- \\
        --model MODEL --input DIR|GLOB|CSV --output DIR [--tasks TASK ...] [--shard i/N] [--device auto|cpu|cuda]

Every scan is loaded with ``slicer.util.loadVolume``, segmented by
``MultiTaskSegLib.mrml.segment_volume_node`` (what the module's Apply button runs) and saved with
``slicer.util.saveNode`` as ``OUTPUT/<case>.seg.nrrd``. Inputs, case names, shards and resuming are
those of ``multitaskseg batch``: a case whose file exists is skipped, each file is saved under a
temporary name and renamed once complete, a failing case is reported and the others go on, and
Slicer exits with status 1 when a case failed.

The script lives outside the module folder because Slicer imports every ``.py`` file of a module
folder at startup; the library is imported inside :func:`main`.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

import slicer


def use_checkout_library() -> None:
    """Run from a source checkout, the library sits one folder up, beside scripts/."""
    checkout = Path(globals().get("__file__", sys.argv[0])).resolve().parent.parent
    if (checkout / "MultiTaskSegLib").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))


def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="batch_in_slicer.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder/.zip or a bundled model's name")
    parser.add_argument("--input", required=True, help="folder of scans, glob pattern or CSV (image[,case])")
    parser.add_argument("--output", required=True, help="folder for the <case>.seg.nrrd files")
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--shard", help="i/N: this machine's share, i from 0 to N-1")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)


def save_atomically(node, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.partial.seg.nrrd")
    if not slicer.util.saveNode(node, str(temporary)):
        raise RuntimeError(f"Slicer could not write {temporary}")
    os.replace(temporary, path)


def segment_case(image: Path, target: Path, model, tasks, device: str) -> None:
    from MultiTaskSegLib.mrml import segment_volume_node

    try:
        volume = slicer.util.loadVolume(str(image))
        segmentation = segment_volume_node(volume, model=model, tasks=tasks, device=device)
        save_atomically(segmentation, target)
    finally:
        slicer.mrmlScene.Clear(0)  # one case at a time in the scene


def main(argv) -> int:
    use_checkout_library()
    from MultiTaskSegLib.batch import (
        list_cases,
        output_path,
        parse_shard,
        remove_stale_temporaries,
        select_shard,
    )
    from MultiTaskSegLib.model_files import load_model

    arguments = parse_arguments(argv)
    output = Path(arguments.output)
    output.mkdir(parents=True, exist_ok=True)
    cases = list_cases(arguments.input)
    if arguments.shard:
        cases = select_shard(cases, *parse_shard(arguments.shard))
    model = load_model(arguments.model)
    failed = {}
    for number, case in enumerate(cases, start=1):
        target = output_path(output, case, "seg.nrrd")
        remove_stale_temporaries(output, case, "seg.nrrd")
        if target.is_file():
            print(f"[{number}/{len(cases)}] {case.name}: already done")
            continue
        try:
            segment_case(case.image, target, model, arguments.tasks, arguments.device)
            print(f"[{number}/{len(cases)}] {case.name}: wrote {target}")
        except Exception as error:  # one bad case must not stop the others
            traceback.print_exc()
            failed[case.name] = str(error)
            print(f"[{number}/{len(cases)}] {case.name}: failed: {error}")
    print(f"{len(cases) - len(failed)} of {len(cases)} cases done; outputs in {output}")
    for name, message in failed.items():
        print(f"failed: {name}: {message}")
    return 1 if failed else 0


if __name__ == "__main__":
    slicer.util.exit(main(sys.argv[1:]))
