"""Where samples come from: paired image/mask folders, MONAI datalists and NIfTI volumes cut into slices.

Every source returns a list of plain dicts with at least ``image``, ``label``, ``name`` and
``dataset`` keys, ready for :func:`medcore_monai.transforms.medsam_preprocess`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medcore_monai.data.errors import DataError
from medcore_monai.data.io import IMAGE_SUFFIXES_2D, read_image_2d

__all__ = [
    "NIFTI_SUFFIXES",
    "datalist_items",
    "drop_empty_masks",
    "folder_pairs",
    "has_foreground",
    "load_volume",
    "nifti_slices",
    "normalise_intensity",
    "sample_stem",
]

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
_INTENSITY_MODES = ("mr", "ct", "none")
_MR_PERCENTILES = (0.5, 99.5)
_CT_WINDOW_LEVEL = 40.0
_CT_WINDOW_WIDTH = 400.0
_MAX_LISTED = 10
_NUMERIC_STEM = re.compile(r"[0-9]+")


def sample_stem(path: str | Path) -> str:
    """File name without its image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _stem_sort_key(stem: str) -> tuple[int, int, str]:
    # Numeric stems ("2", "10") sort as numbers so that 10 does not land between 1 and 2.
    if _NUMERIC_STEM.fullmatch(stem):
        return (0, int(stem), stem)
    return (1, 0, stem)


def _list_summary(values: Iterable[str]) -> str:
    values = sorted(values, key=_stem_sort_key)
    shown = ", ".join(values[:_MAX_LISTED])
    more = len(values) - _MAX_LISTED
    return f"{shown} (+{more} more)" if more > 0 else shown


# --------------------------------------------------------------------------- paired folders


def _is_sample_file(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    name = path.name.lower()
    return path.suffix.lower() in IMAGE_SUFFIXES_2D or name.endswith(NIFTI_SUFFIXES)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} not found: {path}")


def _files_by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(p for p in folder.iterdir() if _is_sample_file(p))
    stems = Counter(sample_stem(p) for p in files)
    duplicates = [p.name for p in files if stems[sample_stem(p)] > 1]
    if duplicates:
        raise DataError(f"Several files share a name stem in {folder}: {', '.join(duplicates)}")
    return {sample_stem(p): p for p in files}


def _check_same_stems(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path) -> None:
    images_only = images.keys() - masks.keys()
    masks_only = masks.keys() - images.keys()
    problems = []
    if images_only:
        problems.append(f"images without a mask in {mask_dir}: {_list_summary(images_only)}")
    if masks_only:
        problems.append(f"masks without an image in {image_dir}: {_list_summary(masks_only)}")
    if problems:
        raise DataError("Image and mask folders do not pair up; " + "; ".join(problems))


def folder_pairs(
    root: str | Path,
    image_dir: str = "images",
    mask_dir: str = "masks",
    dataset: str | None = None,
    drop_empty: bool = False,
    label_value: int | None = None,
) -> list[dict[str, Any]]:
    """Pair ``root/image_dir/<stem>.*`` with ``root/mask_dir/<stem>.*``.

    Files are matched by stem; the suffixes may differ (``a.jpg`` with ``a.png``). Hidden files
    and files of other types (``.txt``, ``.json``) are ignored. 2-D image types and NIfTI
    volumes (``.nii``/``.nii.gz``) are recognised.

    Args:
        root: Dataset folder.
        image_dir: Sub-folder of ``root`` holding the images.
        mask_dir: Sub-folder of ``root`` holding the masks.
        dataset: Dataset tag stored in every item; defaults to the name of ``root``.
        drop_empty: Read every mask and drop samples without foreground (see :func:`drop_empty_masks`).
        label_value: With ``drop_empty``, the label value that counts as foreground.

    Returns:
        Items ``{"image": str, "label": str, "name": stem, "dataset": str}``, purely numeric
        stems first in numeric order, then the other stems in lexicographic order.

    Raises:
        DataError: naming the folder or files, if ``root`` or a sub-folder is missing, a stem
            occurs twice in one folder, images and masks do not pair up, or nothing is found.
    """
    root = Path(root)
    _require_dir(root, "Dataset root")
    images_path, masks_path = root / image_dir, root / mask_dir
    _require_dir(images_path, "Image folder")
    _require_dir(masks_path, "Mask folder")
    images, masks = _files_by_stem(images_path), _files_by_stem(masks_path)
    _check_same_stems(images, masks, images_path, masks_path)
    if not images:
        raise DataError(f"No image files found in {images_path}")
    tag = dataset if dataset is not None else root.name
    items = [
        {"image": str(images[stem]), "label": str(masks[stem]), "name": stem, "dataset": tag}
        for stem in sorted(images, key=_stem_sort_key)
    ]
    return drop_empty_masks(items, label_value=label_value) if drop_empty else items


def has_foreground(mask: np.ndarray, label_value: int | None = None) -> bool:
    """Whether a mask has foreground under the MedSAM binarisation rule.

    Args:
        mask: ``(H, W)`` or channel-last ``(H, W, C)`` mask; only the first channel is used.
        label_value: If given, only pixels equal to it are foreground. Otherwise the threshold is
            0.5 for masks whose maximum is <= 1 and 127 for others (0/255 and JPEG masks).

    Returns:
        True if at least one pixel is foreground.
    """
    first = mask[..., 0] if mask.ndim == 3 else mask
    if label_value is not None:
        return bool(np.any(first == label_value))
    threshold = 0.5 if first.max(initial=0) <= 1 else 127
    return bool(np.any(first > threshold))


def drop_empty_masks(items: Sequence[dict[str, Any]], label_value: int | None = None) -> list[dict[str, Any]]:
    """Keep only items whose ``label`` (a path or an array) has foreground at native resolution.

    A mask of a few pixels can still vanish after the nearest-neighbour resize to the model size;
    :class:`medcore_monai.transforms.BoxFromMaskd` handles that case with its ``empty_mask`` policy.

    Args:
        items: Items with a ``label`` 2-D file path or ``(H, W)`` array (NIfTI volumes are
            filtered by :func:`nifti_slices` instead).
        label_value: Label value that counts as foreground (see :func:`has_foreground`).

    Returns:
        The items with foreground, in input order.
    """
    kept = []
    for item in items:
        label = item["label"]
        mask = np.asarray(label) if isinstance(label, np.ndarray) else read_image_2d(label)
        if has_foreground(mask, label_value):
            kept.append(item)
    return kept


# --------------------------------------------------------------------------- MONAI datalists


def _read_datalist_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as handle:
            content = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataError(f"Datalist {path} is not valid JSON: {error}") from error
    if not isinstance(content, dict):
        raise DataError(f"Datalist {path} must hold a JSON object, got {type(content).__name__}")
    return content


def _dataset_tag_from_datalist(content: dict[str, Any], path: Path) -> str:
    name = content.get("name")
    return name if isinstance(name, str) and name else path.parent.name


def _check_unique_names(items: Sequence[dict[str, Any]], source: Path) -> None:
    counts = Counter(item["name"] for item in items)
    duplicates = [name for name, count in counts.items() if count > 1]
    if duplicates:
        raise DataError(f"Sample names occur more than once in {source}: {_list_summary(duplicates)}")


def datalist_items(
    path: str | Path,
    key: str = "training",
    base_dir: str | Path | None = None,
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Load a Decathlon-style datalist with :func:`monai.data.load_decathlon_datalist`.

    Args:
        path: JSON datalist (e.g. an MSD ``dataset.json``).
        key: Which list in the file to read (``training``, ``validation``, ``test``, ...).
        base_dir: Folder that relative paths are resolved against; defaults to the file's folder.
        dataset: Dataset tag for every item; defaults to the file's ``name`` field, else its folder name.

    Returns:
        The datalist items (absolute ``image``/``label`` paths) with ``name`` (the image's stem
        unless the item has its own ``name``) and ``dataset`` added.

    Raises:
        DataError: naming the file, if it is missing, not valid JSON, lacks ``key``, has an item
            without ``image`` or repeats a sample name.
    """
    from monai.data import load_decathlon_datalist

    path = Path(path)
    if not path.is_file():
        raise DataError(f"Datalist file not found: {path}")
    content = _read_datalist_json(path)
    if key not in content:
        raise DataError(f"Datalist {path} has no list {key!r}; available keys: {', '.join(sorted(content))}")
    raw = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    tag = dataset if dataset is not None else _dataset_tag_from_datalist(content, path)
    items = []
    for index, item in enumerate(raw):
        if "image" not in item:
            raise DataError(f"Item {index} of {key!r} in {path} has no 'image' entry")
        items.append({**item, "name": item.get("name", sample_stem(item["image"])), "dataset": tag})
    _check_unique_names(items, path)
    return items


# --------------------------------------------------------------------------- NIfTI volumes


def load_volume(path: str | Path, as_label: bool) -> tuple[np.ndarray, tuple[float, ...]]:
    """A 3-D NIfTI volume (labels as stored, images as float32) and its voxel spacing; ``DataError`` names bad files."""
    import nibabel as nib

    try:
        volume = nib.load(str(path))
        data = np.asanyarray(volume.dataobj) if as_label else volume.get_fdata(dtype=np.float32)
    except FileNotFoundError as error:
        raise DataError(f"NIfTI file not found: {path}") from error
    except Exception as error:  # nibabel raises several types for corrupt or non-NIfTI files
        raise DataError(f"Cannot read NIfTI file {path}: {error}") from error
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"Expected a 3-D volume in {path}, got shape {data.shape}")
    spacing = tuple(float(z) for z in volume.header.get_zooms()[:3])
    return data, spacing


def _label_foreground(label: np.ndarray, label_value: int | None) -> np.ndarray:
    integer_label = np.rint(label).astype(np.int64)
    return integer_label == label_value if label_value is not None else integer_label > 0


def normalise_intensity(volume: np.ndarray, intensity: str) -> np.ndarray:
    """Clip a volume's intensities before per-slice min-max scaling.

    Args:
        volume: Image volume.
        intensity: ``"mr"``: clip to the 0.5/99.5 percentiles of non-zero voxels (zero is the
            background of skull-stripped and cropped MR); ``"ct"``: soft-tissue window
            (level 40 HU, width 400 HU); ``"none"``: unchanged.

    Returns:
        float32 volume.
    """
    if intensity not in _INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {_INTENSITY_MODES}, got {intensity!r}")
    volume = volume.astype(np.float32, copy=False)
    if intensity == "mr":
        nonzero = volume[volume != 0]
        if nonzero.size == 0:
            return volume
        low, high = np.percentile(nonzero, _MR_PERCENTILES)
        return np.clip(volume, low, high).astype(np.float32)
    if intensity == "ct":
        low, high = _CT_WINDOW_LEVEL - _CT_WINDOW_WIDTH / 2, _CT_WINDOW_LEVEL + _CT_WINDOW_WIDTH / 2
        return np.clip(volume, low, high).astype(np.float32)
    return volume


def _slice_records(
    item: dict[str, Any],
    image: np.ndarray,
    foreground: np.ndarray,
    spacing: tuple[float, ...],
    axis: int,
    min_foreground_pixels: int,
    dataset: str | None,
) -> list[dict[str, Any]]:
    stem = item.get("name") or sample_stem(item["image"])
    tag = dataset if dataset is not None else item.get("dataset", "nifti")
    in_plane_spacing = tuple(s for a, s in enumerate(spacing) if a != axis)
    counts = foreground.sum(axis=tuple(a for a in range(3) if a != axis))
    records = []
    for index in np.flatnonzero(counts >= min_foreground_pixels):
        index = int(index)
        records.append(
            {
                "image": np.ascontiguousarray(np.take(image, index, axis=axis)),
                "label": np.ascontiguousarray(np.take(foreground, index, axis=axis)).astype(np.uint8),
                "name": f"{stem}_s{index:03d}",
                "volume": stem,
                "slice_index": index,
                "slice_axis": axis,
                "spacing": in_plane_spacing,
                "dataset": tag,
                "image_path": str(item["image"]),
                "label_path": str(item["label"]),
            }
        )
    return records


def nifti_slices(
    items: Sequence[dict[str, Any]],
    label_value: int | None = None,
    axis: int = 2,
    min_foreground_pixels: int = 1,
    intensity: str = "mr",
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Cut NIfTI image/label volume pairs into 2-D slice samples.

    Volumes are used in their stored voxel order, without reorientation. With the default
    ``axis=2`` the slice ``k`` is ``data[:, :, k]``: its rows follow the first voxel axis (i) and
    its columns the second (j). In general the 2-D array's axes are the two remaining voxel axes
    in increasing order, and ``spacing`` lists their voxel sizes in the same order.

    Args:
        items: Items with ``image`` and ``label`` NIfTI paths (from :func:`folder_pairs` or
            :func:`datalist_items`); ``name`` (else the image stem) becomes the volume name.
        label_value: Label value to segment; ``None`` means every non-zero label.
        axis: Voxel axis (0, 1 or 2) to slice along.
        min_foreground_pixels: Keep slices with at least this many foreground pixels (0 keeps all).
        intensity: Per-volume intensity clipping, see :func:`normalise_intensity`.
        dataset: Dataset tag; defaults to each item's ``dataset`` (else ``"nifti"``).

    Returns:
        Slice items with ``image`` (float32 ``(H, W)``), ``label`` (uint8 0/1 ``(H, W)``),
        ``name`` (``f"{volume}_s{index:03d}"``), ``volume``, ``slice_index``, ``spacing``
        (in-plane voxel sizes in mm, ordered like the array axes), ``dataset``, and the source
        ``image_path``/``label_path``. Ordered by volume (input order), then slice index.

    Raises:
        DataError: naming the files, if a volume cannot be read, is not 3-D, or image and label
            shapes differ.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if intensity not in _INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {_INTENSITY_MODES}, got {intensity!r}")
    slices: list[dict[str, Any]] = []
    for item in items:
        image, spacing = load_volume(item["image"], as_label=False)
        label, _ = load_volume(item["label"], as_label=True)
        if image.shape != label.shape:
            raise DataError(
                f"Image {item['image']} has shape {image.shape} but label {item['label']} has shape {label.shape}"
            )
        image = normalise_intensity(image, intensity)
        foreground = _label_foreground(label, label_value)
        slices.extend(_slice_records(item, image, foreground, spacing, axis, min_foreground_pixels, dataset))
    return slices
