"""Reproducible train/val/test/calibration splits, saved as a JSON manifest."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medcore_monai.data.errors import DataError

from ..files import write_text_atomic

__all__ = ["SPLIT_NAMES", "SplitManifest", "apply_split", "make_splits", "split_each_dataset"]

SPLIT_NAMES = ("train", "val", "test", "calibration")
_MANIFEST_VERSION = 1
_DEFAULT_DATASET = "default"
_MAX_LISTED = 10


@dataclass
class SplitManifest:
    """Which samples belong to which split, per dataset.

    Attributes:
        seed: Seed of the ``torch.Generator`` that drew each dataset's permutation.
        fractions: ``{"val": ..., "test": ...}`` as requested.
        cal_size: Requested calibration size (the calibration list is shorter if train is).
        group_key: Item key whose value was kept together (e.g. ``"volume"``), or ``None``.
        splits: ``{dataset: {"train" | "val" | "test" | "calibration": [sample names]}}``. Lists are
            in drawn order; ``calibration`` is the first ``cal_size`` entries of ``train``.
        version: Manifest format version.
    """

    seed: int
    fractions: dict[str, float]
    cal_size: int
    splits: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    group_key: str | None = None
    version: int = _MANIFEST_VERSION

    def names(self, split: str, dataset: str | None = None) -> list[str]:
        """Sample names of one split, for one dataset or all of them (datasets in sorted order)."""
        _check_split_name(split)
        return [name for tag in self.dataset_names(dataset) for name in self.splits[tag][split]]

    def dataset_names(self, dataset: str | None = None) -> list[str]:
        """All dataset tags in sorted order, or just ``dataset`` after checking the manifest has it."""
        if dataset is None:
            return sorted(self.splits)
        if dataset not in self.splits:
            raise DataError(f"Split manifest has no dataset {dataset!r}; it has {', '.join(sorted(self.splits))}")
        return [dataset]

    def save(self, path: str | Path) -> Path:
        """Write the manifest as JSON atomically (temporary file in the same folder, then rename).

        Args:
            path: Destination ``.json`` file; parent folders are created.

        Returns:
            The path written.
        """
        return write_text_atomic(path, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> SplitManifest:
        """Read a manifest written by :meth:`save`.

        Raises:
            DataError: naming the file, if it is missing, not JSON or lacks manifest fields.
        """
        path = Path(path)
        if not path.is_file():
            raise DataError(f"Split manifest not found: {path}")
        try:
            content = json.loads(path.read_text())
            manifest = cls(**content)
        except (json.JSONDecodeError, TypeError) as error:
            raise DataError(f"Split manifest {path} is malformed: {error}") from error
        _check_manifest_content(manifest, path)
        return manifest


def _check_manifest_content(manifest: SplitManifest, source: Path) -> None:
    if manifest.version > _MANIFEST_VERSION:
        raise DataError(
            f"Split manifest {source} has version {manifest.version}; this code reads <= {_MANIFEST_VERSION}"
        )
    for tag, lists in manifest.splits.items():
        missing = [split for split in SPLIT_NAMES if split not in lists]
        if missing:
            raise DataError(f"Split manifest {source} lacks {', '.join(missing)} for dataset {tag!r}")


def _check_split_name(split: str) -> None:
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _count(fraction: float, total: int) -> int:
    # At least one unit whenever a split is requested at all, so tiny datasets still get a val/test set.
    return max(1, math.floor(fraction * total)) if fraction > 0 else 0


def _group_items(items: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_dataset: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for index, item in enumerate(items):
        if "name" not in item:
            raise DataError(f"Item {index} has no 'name' (image: {item.get('image', '?')})")
        by_dataset[str(item.get("dataset", _DEFAULT_DATASET))].append(item)
    return by_dataset


def _check_unique(names: Sequence[str], tag: str) -> None:
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise DataError(f"Dataset {tag!r} has repeated sample names: {', '.join(duplicates[:_MAX_LISTED])}")


def _units(items: Sequence[dict[str, Any]], group_key: str | None, tag: str) -> dict[str, list[str]]:
    """Map each split unit (a group, or a single sample) to its sorted sample names."""
    units: dict[str, list[str]] = defaultdict(list)
    for item in items:
        if group_key is not None and group_key not in item:
            raise DataError(f"Sample {item['name']!r} of dataset {tag!r} has no {group_key!r} to group by")
        unit = str(item[group_key]) if group_key is not None else str(item["name"])
        units[unit].append(str(item["name"]))
    return {unit: sorted(names) for unit, names in sorted(units.items())}


def _permuted(values: Sequence[str], generator: torch.Generator) -> list[str]:
    order = torch.randperm(len(values), generator=generator).tolist()
    return [values[i] for i in order]


def _split_one_dataset(
    items: Sequence[dict[str, Any]],
    tag: str,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    cal_size: int,
    group_key: str | None,
) -> dict[str, list[str]]:
    _check_unique([str(item["name"]) for item in items], tag)
    units = _units(items, group_key, tag)
    n_val, n_test = _count(val_fraction, len(units)), _count(test_fraction, len(units))
    if n_val + n_test >= len(units):
        unit_word = f"{group_key} groups" if group_key else "samples"
        raise DataError(f"Dataset {tag!r} has {len(units)} {unit_word}, too few for val, test and train splits")
    # A fresh generator per dataset keeps each dataset's split independent of the others.
    generator = torch.Generator().manual_seed(seed)
    order = _permuted(list(units), generator)
    assigned = {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
    splits = {split: [name for unit in unit_list for name in units[unit]] for split, unit_list in assigned.items()}
    if group_key is not None:
        # Samples of a group are contiguous; shuffle them so the calibration prefix spans many groups.
        splits["train"] = _permuted(splits["train"], generator)
    splits["calibration"] = splits["train"][:cal_size]
    return splits


def make_splits(
    items: Sequence[dict[str, Any]],
    seed: int = 42,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    cal_size: int = 128,
    group_key: str | None = None,
) -> SplitManifest:
    """Split every dataset into train/val/test and pick a calibration subset of train.

    Per dataset (``item["dataset"]``, else ``"default"``), the split units are sorted by name and
    permuted with ``torch.Generator().manual_seed(seed)``; the first ``n_val = max(1,
    floor(val_fraction * N))`` units are validation, the next ``n_test`` (likewise) test, the rest
    train (a fraction of 0 gives an empty split). Sorting first makes the result independent of
    the order of ``items``.

    Args:
        items: Samples with ``name`` (unique per dataset) and optionally ``dataset``.
        seed: Permutation seed.
        val_fraction: Fraction of units for validation.
        test_fraction: Fraction of units for testing.
        cal_size: Number of training samples for calibration (all of train if fewer).
        group_key: Keep all samples sharing this item value in one split (``"volume"`` for
            slices of 3-D scans); fractions then count groups, not samples.

    Returns:
        The manifest, listing sample names.

    Raises:
        DataError: for missing/repeated names, missing group values or datasets too small to split.
    """
    _check_fraction("val_fraction", val_fraction)
    _check_fraction("test_fraction", test_fraction)
    if cal_size < 0:
        raise ValueError(f"cal_size must be >= 0, got {cal_size}")
    by_dataset = _group_items(items)
    if not by_dataset:
        raise DataError("Cannot split an empty list of items")
    splits = {
        tag: _split_one_dataset(members, tag, seed, val_fraction, test_fraction, cal_size, group_key)
        for tag, members in sorted(by_dataset.items())
    }
    fractions = {"val": val_fraction, "test": test_fraction}
    return SplitManifest(seed=seed, fractions=fractions, cal_size=cal_size, splits=splits, group_key=group_key)


def split_each_dataset(
    datasets: Iterable[Sequence[dict[str, Any]]],
    seed: int = 42,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    cal_size: int = 128,
) -> SplitManifest:
    """One manifest for several datasets, each split by :func:`make_splits` on its own.

    Datasets of volume slices (items with a ``volume`` key) keep each volume's slices in one split; 2-D datasets
    beside them are split per image, which one :func:`make_splits` call with a single ``group_key`` cannot do.
    """
    parts = [
        make_splits(samples, seed, val_fraction, test_fraction, cal_size, _volume_key(samples)) for samples in datasets
    ]
    if not parts:
        raise DataError("Cannot split an empty list of datasets")
    return SplitManifest(
        seed=seed,
        fractions=parts[0].fractions,
        cal_size=cal_size,
        splits={tag: lists for part in parts for tag, lists in part.splits.items()},
        group_key="volume" if any(part.group_key for part in parts) else None,
    )


def _volume_key(samples: Sequence[dict[str, Any]]) -> str | None:
    return "volume" if samples and "volume" in samples[0] else None


def apply_split(
    items: Sequence[dict[str, Any]],
    manifest: SplitManifest,
    split: str,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Select the items of one split, in the manifest's order.

    Args:
        items: Samples with ``name`` and optionally ``dataset`` (as given to :func:`make_splits`).
        manifest: The split manifest.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"calibration"``.
        dataset: Restrict to one dataset; ``None`` takes every dataset of the manifest.

    Returns:
        The selected items (the same dict objects), grouped by dataset in sorted order.

    Raises:
        DataError: if the manifest names samples that ``items`` lacks (they are listed).
    """
    _check_split_name(split)
    lookup = {(str(item.get("dataset", _DEFAULT_DATASET)), str(item["name"])): item for item in items}
    selected, missing = [], []
    for tag in manifest.dataset_names(dataset):
        for name in manifest.splits[tag][split]:
            item = lookup.get((tag, name))
            if item is None:
                missing.append(f"{tag}/{name}")
            else:
                selected.append(item)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED])
        more = f" (+{len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise DataError(f"Split manifest names {len(missing)} samples missing from the items: {shown}{more}")
    return selected
