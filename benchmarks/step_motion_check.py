"""What RobustMedSAM's ``step_motion`` corruption does to an image, and why it can raise Dice.

Usage::

    python benchmarks/step_motion_check.py                       # synthetic + hippocampus image statistics
    python benchmarks/step_motion_check.py --checkpoint bundle/models/medsam_tiny.pth --max-slices 40

The reference (RobustMedSAM ``data/augment.py``) multiplies the lower half of the fftshift-ed k-space rows by
``exp(-2j*pi*shift*k/cols)`` with ``k = 0 .. cols-1`` the *shifted* column index. Writing ``k = u + cols/2``
(``u`` the signed frequency) gives ``exp(-2j*pi*shift*u/cols) * (-1)**shift``: a true half-k-space shift
times a sign that, for odd shifts, inverts half of k-space. This script separates the two parts:

* ``reference``: the project's ``corrupt(..., "step_motion", s)`` (a transcription of the reference);
* ``shift only``: the signed-frequency ramp alone (physical step motion: ghosts, no inversion);
* ``flip only``: the lower half negated, no shift.

For each it prints the deviation from the clean image, its correlation with the clean image and with the
``flip only`` image, the gradient energy relative to clean (above 1: sharper/edgier, below: blurrier), the
share of the variance that is constant down each column (vertical streaks) and the intensity range. On the
hippocampus slices it adds the contrast between the hippocampus and a ring around it, and with
``--checkpoint`` the model's pixel Dice and predicted/true area on clean and corrupted slices.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from medcore_monai.transforms.corruptions import corrupt, severity_parameters

SAMPLE = Path(__file__).resolve().parents[1] / "bundle" / "sample_data" / "hippocampus"


# --------------------------------------------------------------------------- variants


def _kspace(plane: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft2(plane.astype(np.float64)))


def _image(spectrum: np.ndarray) -> np.ndarray:
    return np.clip(np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum))), 0.0, 1.0)


def shift_only(plane: np.ndarray, shift: int) -> np.ndarray:
    """Lower half of the k-space rows moved by ``shift`` px with the signed-frequency ramp (no inversion)."""
    spectrum = _kspace(plane)
    rows, cols = spectrum.shape
    signed = np.arange(cols) - cols // 2
    spectrum[rows // 2 :] *= np.exp(-2j * np.pi * shift * signed / cols)
    return _image(spectrum)


def flip_only(plane: np.ndarray) -> np.ndarray:
    """Lower half of the k-space rows negated, nothing shifted: the part odd reference shifts add."""
    spectrum = _kspace(plane)
    spectrum[spectrum.shape[0] // 2 :] *= -1.0
    return _image(spectrum)


# --------------------------------------------------------------------------- measurements


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def gradient_energy(plane: np.ndarray) -> float:
    """Mean squared finite difference over both axes (edge content)."""
    return float(np.mean(np.diff(plane, axis=0) ** 2) + np.mean(np.diff(plane, axis=1) ** 2))


def streak_share(plane: np.ndarray) -> float:
    """Share of the variance that is constant down each column (vertical streaks)."""
    return float(plane.mean(axis=0).var() / plane.var()) if plane.var() > 0 else float("nan")


def describe(out: np.ndarray, clean: np.ndarray, flipped: np.ndarray) -> dict[str, float]:
    """Deviation, correlations, edge content, streaks and intensity range of ``out`` against ``clean``."""
    return {
        "mad": float(np.abs(out - clean).mean()),
        "r_clean": _corr(out, clean),
        "r_flip": _corr(out, flipped),
        "grad_x": gradient_energy(out) / gradient_energy(clean),
        "streaks": streak_share(out),
        "mean": float(out.mean()),
        "p1": float(np.percentile(out, 1)),
        "p99": float(np.percentile(out, 99)),
    }


def _print_table(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    keys = list(next(iter(rows.values())))
    print(f"{'variant':<22}" + "".join(f"{k:>9}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<22}" + "".join(f"{row[k]:>9.3f}" for k in keys))


def variants(plane: np.ndarray) -> dict[str, dict[str, float]]:
    """:func:`describe` of the reference, shift-only and flip-only images of one grey plane."""
    flipped = flip_only(plane)
    rows = {"clean": describe(plane, plane, flipped), "flip only": describe(flipped, plane, flipped)}
    for severity in (1, 3, 5):
        shift = severity_parameters("step_motion", severity)["shift_px"]
        reference = corrupt(plane[None].astype(np.float32), "step_motion", severity)[0]
        rows[f"reference sev {severity} ({shift}px)"] = describe(reference, plane, flipped)
        rows[f"shift only {shift}px"] = describe(shift_only(plane, shift), plane, flipped)
    return rows


# --------------------------------------------------------------------------- images


def synthetic_plane(size: int = 256, seed: int = 0) -> np.ndarray:
    """A noisy MR-like slice: dark background, a bright ellipse with a darker inner structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    head = ((yy - 0.5) / 0.42) ** 2 + ((xx - 0.5) / 0.36) ** 2 <= 1
    inner = ((yy - 0.55) / 0.08) ** 2 + ((xx - 0.42) / 0.14) ** 2 <= 1
    plane = 0.05 + 0.55 * head - 0.2 * inner + rng.normal(0.0, 0.03, (size, size))
    return np.clip((plane - plane.min()) / (plane.max() - plane.min()), 0.0, 1.0)


def hippocampus_samples(size: int, max_slices: int) -> list[dict]:
    """Preprocessed slices of the embedded CC BY-SA sample, as the evaluate workflow builds them."""
    from medcore_monai.transforms.samples import dataset_specs, load_items, preprocess_split

    items = load_items(dataset_specs([str(SAMPLE)], None, None)[0])[:max_slices]
    return list(preprocess_split(items, size, 5, 42, None))


def ring_contrast(plane: np.ndarray, mask: np.ndarray, width: int = 6) -> float:
    """|mean inside - mean in a ring around the mask| / std of the ring (how visible the object is)."""
    from scipy.ndimage import binary_dilation

    ring = binary_dilation(mask, iterations=width) & ~mask
    return float(abs(plane[mask].mean() - plane[ring].mean()) / (plane[ring].std() + 1e-6))


def hippocampus_contrast(samples: list[dict]) -> None:
    """Object-vs-ring contrast, clean and per variant, averaged over slices."""
    table: dict[str, list[float]] = {}
    for sample in samples:
        plane = sample["image"][0].numpy().astype(np.float64)
        mask = sample["label"][0].numpy() > 0
        if mask.sum() < 20:
            continue
        table.setdefault("clean", []).append(ring_contrast(plane, mask))
        table.setdefault("flip only", []).append(ring_contrast(flip_only(plane), mask))
        for severity in (1, 3, 5):
            out = corrupt(plane[None].astype(np.float32), "step_motion", severity)[0]
            table.setdefault(f"reference sev {severity}", []).append(ring_contrast(out, mask))
            shift = severity_parameters("step_motion", severity)["shift_px"]
            table.setdefault(f"shift only {shift}px", []).append(ring_contrast(shift_only(plane, shift), mask))
    print(f"\nhippocampus vs 6-px ring contrast (mean over {len(table.get('clean', []))} slices)")
    for name, values in table.items():
        print(f"{name:<22}{np.mean(values):>9.3f}")


@torch.no_grad()
def model_probe(samples: list[dict], checkpoint: str) -> None:
    """Pixel Dice and predicted/true area of the model on clean, reference and shift-only slices."""
    from medcore_monai.networks import as_medsam, load_sam

    model = as_medsam(load_sam(checkpoint)).eval()
    conditions = {
        "clean": lambda x: x,
        "reference sev 3": lambda x: corrupt(x, "step_motion", 3),
        "flip only": lambda x: torch.stack([torch.from_numpy(flip_only(c.numpy())).float() for c in x]),
        "shift only 5px": lambda x: torch.stack([torch.from_numpy(shift_only(c.numpy(), 5)).float() for c in x]),
    }
    print(f"\nmodel {checkpoint} on {len(samples)} slices (pixel Dice, predicted area / true area, mean)")
    for name, change in conditions.items():
        dice, area = [], []
        for sample in samples:
            image = change(sample["image"].as_tensor() if hasattr(sample["image"], "as_tensor") else sample["image"])
            logits = model(image[None].float(), sample["box"][None].float())
            pred = (logits[0, 0] > 0).numpy()
            truth = torch.nn.functional.interpolate(sample["label"][None].float(), size=pred.shape)[0, 0].numpy() > 0
            if truth.sum() == 0:
                continue
            dice.append(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))
            area.append(pred.sum() / truth.sum())
        print(f"{name:<22} Dice {np.mean(dice):.3f}   area ratio {np.mean(area):.2f}")


def main() -> None:
    """Print the tables (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="model input size (the tiny pair uses 256)")
    parser.add_argument("--max-slices", type=int, default=64)
    parser.add_argument("--checkpoint", default=None, help="also run this model on clean and corrupted slices")
    args = parser.parse_args()

    _print_table("synthetic MR-like slice", variants(synthetic_plane(args.size)))
    if not SAMPLE.is_dir():
        return
    samples = hippocampus_samples(args.size, args.max_slices)
    middle = samples[len(samples) // 2]
    _print_table(f"hippocampus slice {middle['name']}", variants(middle["image"][0].numpy().astype(np.float64)))
    hippocampus_contrast(samples)
    if args.checkpoint:
        model_probe(samples, args.checkpoint)


if __name__ == "__main__":
    main()
