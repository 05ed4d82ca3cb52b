"""Data roots -> preprocessed, split, cached model-size MedSAM samples, for code outside the bundle.

The pair training, the benchmarks and the flat ``leverage`` workflow build their samples here; the bundle uses
:class:`medcore_monai.data.SplitDatalists` with its own transforms in config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.cache import build_dataset
from ..data.errors import DataError
from ..data.sources import NIFTI_SUFFIXES, datalist_items, folder_pairs, nifti_slices
from ..data.splits import SplitManifest, apply_split, split_each_dataset
from .medsam import medsam_preprocess

__all__ = [
    "DatasetSpec",
    "SplitData",
    "dataset_specs",
    "load_items",
    "prepare_splits",
    "preprocess_split",
    "tight_box_samples",
]


@dataclass(frozen=True)
class DatasetSpec:
    """One data root: a folder with ``images/`` + ``masks/`` (2D files or NIfTI volumes) or a datalist JSON."""

    root: str
    name: str
    label_value: int | None = None
    datalist_key: str = "training"
    slice_axis: int = 2
    intensity: str = "mr"


def dataset_specs(
    data_roots: Sequence[str | Path], dataset_names: Sequence[str] | None = None, label_value: int | None = None
) -> list[DatasetSpec]:
    """One spec per data root; names default to the root's folder (or file) name without suffixes."""
    names = list(dataset_names) if dataset_names else [Path(r).name.split(".")[0] for r in data_roots]
    if len(names) != len(data_roots):
        raise ValueError(f"{len(names)} dataset_names for {len(data_roots)} data_roots")
    return [DatasetSpec(root=str(r), name=n, label_value=label_value) for r, n in zip(data_roots, names)]


def _is_nifti(path: Any) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def load_items(spec: DatasetSpec) -> list[dict[str, Any]]:
    """Sample dicts of one dataset; NIfTI volumes are sliced to 2D slices that contain foreground.

    Raises:
        DataError: when the root is missing, empty or inconsistent.
    """
    root = Path(spec.root)
    if not root.exists():
        raise DataError(f"data root not found: {root}")
    if root.is_file():
        items = datalist_items(root, key=spec.datalist_key, dataset=spec.name)
    else:
        items = folder_pairs(root, dataset=spec.name)
    if items and _is_nifti(items[0]["image"]):
        items = nifti_slices(
            items, label_value=spec.label_value, axis=spec.slice_axis, intensity=spec.intensity, dataset=spec.name
        )
    if not items:
        raise DataError(f"no usable samples in {root}")
    return items


@dataclass
class SplitData:
    """Items of every dataset and the split manifest that partitions them."""

    items: dict[str, list[dict[str, Any]]]
    manifest: SplitManifest

    def split(self, dataset: str, name: str) -> list[dict[str, Any]]:
        """Items of ``dataset`` in split ``name`` (train/val/test/calibration)."""
        return apply_split(self.items[dataset], self.manifest, name, dataset=dataset)


def prepare_splits(
    specs: Sequence[DatasetSpec],
    seed: int = 42,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    cal_size: int = 128,
    manifest_path: str | Path | None = None,
) -> SplitData:
    """Load every dataset and split it reproducibly (or reuse a saved manifest)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise DataError(f"dataset names must be unique, got {names}")
    items = {spec.name: load_items(spec) for spec in specs}
    if manifest_path is not None and Path(manifest_path).is_file():
        return SplitData(items, SplitManifest.load(manifest_path))
    manifest = split_each_dataset(items.values(), seed, val_fraction, test_fraction, cal_size)
    return SplitData(items, manifest)


def preprocess_split(
    items: Sequence[dict[str, Any]],
    size: int,
    bbox_shift: int = 0,
    seed: int = 0,
    label_value: int | None = None,
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    progress: bool = False,
    lowres_size: int | None = None,
):
    """A cached dataset of preprocessed samples (deterministic per-sample box jitter).

    ``lowres_size`` is the decoder's output size (``None``: ``size // 4``, SAM's; LiteMedSAM's is ``size``).
    """
    transform = medsam_preprocess(
        size=size,
        bbox_shift=bbox_shift,
        seed=seed,
        deterministic=True,
        label_value=label_value,
        lowres_size=lowres_size,
    )
    return build_dataset(list(items), transform, cache=cache, cache_dir=cache_dir, progress=progress)


def tight_box_samples(
    data: SplitData,
    size: int,
    split: str = "calibration",
    seed: int = 0,
    label_value: int | None = None,
    lowres_size: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Preprocessed samples of one split with tight boxes, per dataset, named ``<dataset>/<sample>``.

    The calibration samples of code outside the bundle (benchmarks): the same selection and naming as the
    bundle's ``calibration#samples``.
    """
    out = {}
    for dataset in data.items:
        samples = preprocess_split(data.split(dataset, split), size, 0, seed, label_value, lowres_size=lowres_size)
        out[dataset] = [dict(samples[i]) | {"name": f"{dataset}/{samples[i]['name']}"} for i in range(len(samples))]
    return out
