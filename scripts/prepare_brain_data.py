"""Lay out the shared brain data as training folders of one cross-validation fold (symbolic links).

Every real subject gives a skull-stripped case and, where there is one, a whole-head case (the
same aseg: everything outside the brain is background); the SynthSeg label maps give label-map-only
cases whose images are synthesised during training. The held-out subjects of a fold appear in
neither form, so no subject is both trained on and judged.

    python scripts/prepare_brain_data.py --shared ../shared/data --out runs/brain/fold1 --hold-out fstd-sub-01 fstd-sub-02 bert
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def subjects(shared: Path) -> dict[str, Path]:
    found = {}
    for parent in ("brain_fs", "brain_aseg"):
        for folder in sorted((shared / parent).glob("*")):
            if (folder / "t1.nii.gz").exists() and (folder / "aseg.nii.gz").exists():
                found[folder.name] = folder
    return found


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    if link_path.is_symlink() or link_path.exists():
        link_path.unlink()
    link_path.symlink_to(target.resolve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--hold-out", nargs="*", default=[], help="subjects kept for evaluation")
    parser.add_argument("--label-maps", type=int, default=20, help="how many SynthSeg label maps to use")
    arguments = parser.parse_args()
    found = subjects(arguments.shared)
    unknown = sorted(set(arguments.hold_out) - set(found))
    if unknown:
        parser.error(f"unknown subject(s) {', '.join(unknown)}; known: {', '.join(found)}")
    train = arguments.out / "train" / "brain_t1_mri"
    held = arguments.out / "held_out"
    for name, folder in found.items():
        target = held if name in arguments.hold_out else train
        link(folder / "t1.nii.gz", target / name / "t1.nii.gz")
        link(folder / "aseg.nii.gz", target / name / "aseg.nii.gz")
        if (folder / "t1_head.nii.gz").exists():
            link(folder / "t1_head.nii.gz", target / f"{name}_head" / "t1.nii.gz")
            link(folder / "aseg.nii.gz", target / f"{name}_head" / "aseg.nii.gz")
    for path in sorted((arguments.shared / "synthseg_label_maps").glob("*.nii.gz"))[: arguments.label_maps]:
        link(path, train / f"synth_{path.name.split('.')[0]}" / "aseg.nii.gz")
    summary = {"held_out": sorted(arguments.hold_out), "training_subjects": sorted(set(found) - set(arguments.hold_out))}
    (arguments.out / "fold.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
