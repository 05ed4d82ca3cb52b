"""Data roots -> reproducible train/val/test/calibration datalists, the bundle's convenience ids.

A bundle's ``train#dataset#data`` is a plain list of ``{"image", "label"}`` items (MONAI Label passes its own);
:class:`SplitDatalists` makes those lists from ``data_roots`` (image/mask folders, NIfTI volume folders or MONAI
datalist JSON files). 2-D items are images; volume items are whole volumes with the slice indices that belong to
the split under ``slices`` (the dataset cuts them with :class:`medcore_monai.transforms.SplitSlicesd`).

The split is drawn at sample level, exactly as :func:`medcore_monai.data.splits.make_splits` always did: slices of
one volume stay in one split (fractions count volumes), and the calibration set is the first ``cal_size`` training
*slices* of a seeded shuffle, so it spans many volumes. Only label volumes are read to find the slices that hold
the structure; images are read later by the dataset's transforms.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .sources import NIFTI_SUFFIXES, datalist_items, folder_pairs, load_volume
from .splits import SPLIT_NAMES, SplitManifest, apply_split, split_each_dataset

__all__ = ["SplitDatalists", "all_items", "calibration_groups", "dataset_name", "foreground_slices", "pooled"]

logger = logging.getLogger(__name__)


def dataset_name(root: str | Path) -> str:
    """Default dataset name of a data root: its folder (or datalist file) name without suffixes."""
    return Path(str(root)).name.split(".")[0]


def _is_volume(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).lower().endswith(NIFTI_SUFFIXES)


def foreground_slices(label_path: str | Path, axis: int = 2, label_value: int | None = None) -> list[int]:
    """Indices of the slices along ``axis`` of a label volume that hold foreground (the label policy's rule)."""
    label, _ = load_volume(label_path, as_label=True)
    labels = np.rint(label).astype(np.int64)
    foreground = labels == label_value if label_value is not None else labels != 0
    counts = foreground.sum(axis=tuple(a for a in range(3) if a != axis))
    return [int(i) for i in np.flatnonzero(counts)]


def _root_items(root: str, name: str) -> list[dict[str, Any]]:
    path = Path(root)
    if not path.exists():
        raise DataError(f"data root not found: {root}")
    items = datalist_items(path, dataset=name) if path.is_file() else folder_pairs(path, dataset=name)
    if not items:
        raise DataError(f"no samples in {root}")
    return items


@dataclass
class SplitDatalists:
    """Split datalists of one or several data roots.

    Args:
        data_roots: dataset folders (``images/`` + ``masks/``) or MONAI datalist JSON files.
        dataset_names: one name per root (default: the folder names); they tag every item and the report.
        seed: split seed.
        val_fraction: fraction of images (volumes) for validation, per dataset.
        test_fraction: fraction for testing.
        cal_size: calibration samples (slices for volumes) per dataset, drawn from train.
        label_value: label to segment (``None``: every non-zero label), as in :class:`BinarizeLabeld`.
        slice_axis: axis along which volumes are cut.
        split_manifest: an existing ``splits.json`` to reuse instead of drawing a split.
    """

    data_roots: Sequence[str]
    dataset_names: Sequence[str] | None = None
    seed: int = 42
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    cal_size: int = 128
    label_value: int | None = None
    slice_axis: int = 2
    split_manifest: str | None = None
    items: dict[str, list[dict[str, Any]]] = field(init=False, repr=False)
    _manifest: SplitManifest | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        roots = [str(r) for r in ([self.data_roots] if isinstance(self.data_roots, str) else self.data_roots)]
        if not roots:
            raise DataError("data_roots is empty")
        names = list(self.dataset_names) if self.dataset_names else [dataset_name(r) for r in roots]
        if len(names) != len(roots):
            raise DataError(f"{len(names)} dataset_names for {len(roots)} data_roots")
        if len(set(names)) != len(names):
            raise DataError(f"dataset names must be unique, got {names}")
        self.items = {name: _root_items(root, name) for root, name in zip(roots, names)}
        self._samples_by_dataset = {name: self._samples(name, items) for name, items in self.items.items()}
        if self.split_manifest is not None:
            self._manifest = SplitManifest.load(self.split_manifest)

    @property
    def manifest(self) -> SplitManifest:
        """The split manifest: the given ``split_manifest``, else drawn on first use (``all`` needs none)."""
        if self._manifest is None:
            self._manifest = split_each_dataset(
                self._samples_by_dataset.values(), self.seed, self.val_fraction, self.test_fraction, self.cal_size
            )
        return self._manifest

    def _samples(self, name: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Sample-level entries (name, dataset, volume) that the split manifest lists."""
        out = []
        for item in items:
            if not _is_volume(item["image"]):
                out.append(item | {"dataset": name})
                continue
            volume = str(item["name"])
            for index in foreground_slices(item["label"], self.slice_axis, self.label_value):
                out.append({"name": f"{volume}_s{index:03d}", "volume": volume, "slice_index": index, "dataset": name})
        return out

    @property
    def dataset_list(self) -> list[str]:
        """Dataset names in the order of ``data_roots``."""
        return list(self.items)

    def split(self, split: str, dataset: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Items of one split (all datasets, or one): 2-D items, or volumes with their ``slices``.

        ``split`` is a manifest split (``train``, ``val``, ``test``, ``calibration``) or ``all`` (every image of the
        data roots in their order, with no split drawn: a folder too small to split can still be evaluated).
        ``limit`` keeps the first items (images or volumes) per dataset. Volume items keep the manifest's order of
        first appearance; their ``slices`` are in manifest order.
        """
        if split != "all" and split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {(*SPLIT_NAMES, 'all')}, got {split!r}")
        if limit is not None and int(limit) < 1:
            raise ValueError(f"limit must be a positive number of items, got {limit!r}")
        out: list[dict[str, Any]] = []
        for name in [dataset] if dataset else self.items:
            samples = self._samples_by_dataset[name]
            selected = samples if split == "all" else apply_split(samples, self.manifest, split, name)
            items = self._as_items(name, selected)
            if limit is not None and len(items) > int(limit):
                logger.warning("%s: %s split truncated to %d of %d items", name, split, int(limit), len(items))
                items = items[: int(limit)]
            out += items
        return out

    def _as_items(self, name: str, selected: list[dict[str, Any]]) -> list[dict[str, Any]]:
        by_name = {str(item["name"]): item for item in self.items[name]}
        volumes: dict[str, dict[str, Any]] = {}
        out: list[dict[str, Any]] = []
        for sample in selected:
            if "volume" not in sample:
                out.append(dict(by_name[str(sample["name"])]) | {"dataset": name})
                continue
            entry = volumes.get(sample["volume"])
            if entry is None:
                source = by_name[sample["volume"]]
                entry = volumes[sample["volume"]] = {
                    "image": source["image"],
                    "label": source["label"],
                    "name": sample["volume"],
                    "volume": sample["volume"],
                    "dataset": name,
                    "slice_axis": self.slice_axis,
                    "slices": [],
                }
                out.append(entry)
            entry["slices"].append(int(sample["slice_index"]))
        return out

    def split_head(self, split: str, count: int) -> list[dict[str, Any]]:
        """Items holding the first ``count`` samples of a split per dataset (images, or slices of volumes).

        The samples are taken in manifest order, so the head of ``train`` begins with the calibration samples.
        """
        if int(count) < 1:
            raise ValueError(f"count must be a positive number of samples, got {count!r}")
        out: list[dict[str, Any]] = []
        for name in self.items:
            selected = apply_split(self._samples_by_dataset[name], self.manifest, split, name)[: int(count)]
            out += self._as_items(name, selected)
        return out

    def sample_names(self, split: str) -> list[str]:
        """Sample names of a split in manifest order (slices for volumes), e.g. to order calibration samples."""
        return [str(n) for name in self.items for n in self.manifest.splits[name][split]]

    @property
    def train(self) -> list[dict[str, Any]]:
        """Training items."""
        return self.split("train")

    @property
    def val(self) -> list[dict[str, Any]]:
        """Validation items."""
        return self.split("val")

    @property
    def test(self) -> list[dict[str, Any]]:
        """Test items."""
        return self.split("test")

    @property
    def calibration(self) -> list[dict[str, Any]]:
        """Calibration items (a subset of train)."""
        return self.split("calibration")

    def counts(self) -> dict[str, dict[str, int]]:
        """Samples per dataset and split (slices for volumes)."""
        return {name: {s: len(self.manifest.splits[name][s]) for s in SPLIT_NAMES} for name in self.items}

    def save(self, path: str | Path) -> Path:
        """Write the split manifest (``splits.json``) atomically."""
        return self.manifest.save(path)


def calibration_groups(dataset: Any, datalists: SplitDatalists) -> dict[str, list[dict[str, Any]]]:
    """Preprocessed calibration samples per dataset, named ``<dataset>/<sample>``, in the split manifest's order.

    The order matters: recovery draws samples by index, so a run reproduces only with the same order.

    Args:
        dataset: the calibration dataset (e.g. a :class:`~medcore_monai.data.SampleCacheDataset`).
        datalists: the split it was made from.
    """
    return split_groups(dataset, datalists, "calibration")


def split_groups(
    dataset: Any, datalists: SplitDatalists, split: str, count: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Preprocessed samples of a split (its first ``count`` per dataset) as :func:`calibration_groups` names them.

    Args:
        dataset: a dataset of preprocessed samples holding at least those (e.g. made from
            :meth:`SplitDatalists.split_head`).
        datalists: the split it was made from.
        split: the manifest split.
        count: samples per dataset (``None``: all of the split).
    """
    samples = [dataset[i] for i in range(len(dataset))]
    by_key = {(str(s.get("dataset", "data")), str(s["name"])): s for s in samples}
    groups: dict[str, list[dict[str, Any]]] = {}
    for name in datalists.items:
        names = datalists.manifest.splits[name][split][:count]
        missing = [n for n in names if (name, str(n)) not in by_key]
        if missing:
            raise DataError(f"{name}: {len(missing)} {split} samples are not in the dataset, e.g. {missing[0]!r}")
        groups[name] = [dict(by_key[(name, str(n))]) | {"name": f"{name}/{n}"} for n in names]
    return groups


def pooled(groups: Mapping[str, Sequence[Any]]) -> list[Any]:
    """All samples of per-dataset groups, dataset by dataset."""
    return [sample for group in groups.values() for sample in group]


def all_items(
    data_roots: Sequence[str] | str, dataset_names: Sequence[str] | None = None, slice_axis: int = 2
) -> list[dict[str, Any]]:
    """Every item of the data roots, unsplit (2-D images, or whole volumes), tagged with its dataset name.

    For inference on folders of any size; :class:`SplitDatalists` needs enough images for three splits.
    """
    roots = [str(r) for r in ([data_roots] if isinstance(data_roots, str) else data_roots)]
    names = list(dataset_names) if dataset_names else [dataset_name(r) for r in roots]
    if len(names) != len(roots):
        raise DataError(f"{len(names)} dataset_names for {len(roots)} data_roots")
    items = []
    for root, name in zip(roots, names):
        for item in _root_items(root, name):
            extra = {"volume": item["name"], "slice_axis": slice_axis} if _is_volume(item["image"]) else {}
            items.append(dict(item) | {"dataset": name} | extra)
    return items
