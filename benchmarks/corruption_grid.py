"""Render RobustMedSAM's 12 corruptions on one slice of the embedded MSD Hippocampus sample.

Usage::

    python benchmarks/corruption_grid.py --out docs/images/corruptions_grid.png

The slice is the axial slice with the largest hippocampus area in the embedded sample
(``bundle/sample_data/hippocampus``, CC BY-SA 4.0; ties go to the slice nearest the middle of its
volume), min-max scaled to [0, 1], resized bilinearly to ``--size`` pixels square and replicated to
three channels, i.e. the kind of image MedSAM's preprocessing feeds the model. The PNG is derived from
CC BY-SA 4.0 data and carries the attribution in its title. Kvasir images are not used: their licence
forbids redistribution.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from medcore_monai.reports.corruptions import plot_corruption_grid
from medcore_monai.transforms.medsam import min_max_scale

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample_data" / "hippocampus"


def pick_slice(sample: Path, case: str | None) -> tuple[str, int, np.ndarray]:
    """(case, axial index, 2D image) of the axial slice with the largest hippocampus area."""
    best: tuple[int, float, str, int] | None = None
    names = [case] if case else sorted(p.name.removesuffix(".nii.gz") for p in (sample / "masks").glob("*.nii.gz"))
    for name in names:
        mask = np.asarray(nib.load(sample / "masks" / f"{name}.nii.gz").dataobj) > 0
        areas = mask.sum(axis=(0, 1))  # images are RAS, so the third axis is axial
        index = int(np.argmax(areas))
        # largest area first, then nearest to the volume middle, then name/index for a total order
        ties = np.flatnonzero(areas == areas[index])
        index = int(ties[np.argmin(np.abs(ties - (mask.shape[2] - 1) / 2))])
        key = (int(areas[index]), -abs(index - (mask.shape[2] - 1) / 2), name, index)
        if best is None or key[:2] > best[:2]:
            best = key
    if best is None:
        raise FileNotFoundError(f"No masks under {sample / 'masks'}")
    _, _, name, index = best
    volume = np.asarray(nib.load(sample / "images" / f"{name}.nii.gz").dataobj, dtype=np.float32)
    # rotate so that anterior is at the top of the picture
    return name, index, np.ascontiguousarray(np.rot90(volume[:, :, index]))


def model_input(plane: np.ndarray, size: int) -> torch.Tensor:
    """Min-max scale, bilinear resize to ``size`` square, replicate to ``[3, size, size]``."""
    scaled = min_max_scale(torch.from_numpy(plane))
    resized = F.interpolate(scaled[None, None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized.clamp(0.0, 1.0).repeat(3, 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/images/corruptions_grid.png")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="folder with images/ and masks/")
    parser.add_argument("--case", default=None, help="e.g. hippocampus_006 (default: best slice of all cases)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args()

    case, index, plane = pick_slice(args.sample, args.case)
    image = model_input(plane, args.size)
    title = (
        f"RobustMedSAM corruptions (severity 3 = published setting; 0–255 units). Image: MSD Task04 Hippocampus "
        f"{case}, axial slice {index}, CC BY-SA 4.0 (Antonelli et al. 2022; Simpson et al. 2019)"
    )
    path = plot_corruption_grid(image, args.out, args.severities, seed=args.seed, title=title, dpi=args.dpi)
    print(f"{path} ({path.stat().st_size / 1e6:.2f} MB; {case} slice {index})")


if __name__ == "__main__":
    main()
