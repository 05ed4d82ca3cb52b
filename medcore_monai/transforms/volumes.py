"""CT/MR intensity and volume-to-slice transforms, so hospital volumes reach MedSAM's 2-D model from config.

MedSAM is a 2-D model: a NIfTI volume is windowed (CT) or percentile-clipped (MR) as a whole, then cut into the
slices that hold the structure. The intensity step is MONAI's own where MONAI has it (``ScaleIntensityRanged``
for a CT window); MedSAM's MR rule clips at percentiles of the *non-zero* voxels, which no MONAI transform does,
hence :class:`ClipNonzeroPercentilesd`. :class:`ByDatasetd` applies a different intensity chain per dataset of
one run (a CT and an MR dataset side by side). :class:`SplitSlicesd` returns one dictionary per slice (MONAI
datasets and ``Compose`` handle transforms that return lists, as ``RandCropByPosNegLabeld`` does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Transform

__all__ = ["ByDatasetd", "ClipNonzeroPercentilesd", "SplitSlicesd", "slice_name", "volume_name"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# below this an intensity is air in CT (about -1000 HU); MR magnitudes are not negative
_CT_LIKE_MINIMUM = -500.0
logger = logging.getLogger(__name__)


def volume_name(path: str | Path) -> str:
    """A volume's name: its file name without the NIfTI suffix."""
    name = Path(str(path)).name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def slice_name(volume: str, index: int) -> str:
    """The sample name of slice ``index`` of ``volume`` (``case_004_s012``)."""
    return f"{volume}_s{int(index):03d}"


#: Image metadata key holding why an image's values looked suspicious (counted in evaluation reports).
VALUE_WARNING = "medcore_value_warning"


class ClipNonzeroPercentilesd(MapTransform):
    """Clip each image to the percentiles of its non-zero voxels (MedSAM's MR rule; zero is background)."""

    def __init__(
        self, keys: KeysCollection = ("image",), lower: float = 0.5, upper: float = 99.5, allow_missing_keys=False
    ) -> None:
        """Create the transform.

        Args:
            keys: keys of images (volumes or 2-D).
            lower: lower percentile (0-100) of the non-zero voxels.
            upper: upper percentile.
            allow_missing_keys: skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got {lower}, {upper}")
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Clip every key (an all-zero image stays as it is)."""
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            warning = None
            if float(values.min()) < _CT_LIKE_MINIMUM:
                # a policy, not an error: MR clipping still runs, the user is told what the values look like, and
                # the evaluation reports count such images (DatasetMetrics reads VALUE_WARNING from the metadata)
                warning = f"values down to {float(values.min()):.0f} (CT-like) under the MR percentile rule"
                logger.warning("%s has %s; use configs/ct.yaml for a CT window", _filename(image), warning)
            nonzero = values[values != 0]
            if nonzero.numel():
                low, high = np.percentile(nonzero.float().cpu().numpy(), (self.lower, self.upper))
                d[key] = torch.clamp(image.float(), float(low), float(high))
            if warning is not None and isinstance(d[key], MetaTensor):
                d[key].meta[VALUE_WARNING] = warning
        return d


class ByDatasetd(Transform):
    """Apply the transform chain of each item's dataset (items carry their dataset name under ``key``).

    The chain is looked up by the item's dataset name, else by its kind (``"volumes"`` for channel-first 3-D
    images, ``"images"`` for 2-D ones), else under ``"*"``; without any, the item passes unchanged.

    Args:
        transforms: ``{dataset name | "volumes" | "images" | "*": transform or list of transforms}``.
        key: item key holding the dataset name.
        image_key: key of the image whose dimensionality gives the kind.
    """

    def __init__(
        self,
        transforms: Mapping[str, Callable | Sequence[Callable] | None],
        key: str = "dataset",
        image_key: str = "image",
    ) -> None:
        self.key, self.image_key = key, image_key
        self.transforms = {name: self._compose(chain) for name, chain in dict(transforms or {}).items()}

    @staticmethod
    def _compose(chain: Callable | Sequence[Callable] | None) -> Callable | None:
        if chain is None:
            return None
        return Compose(list(chain)) if isinstance(chain, (list, tuple)) else chain

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        """The item after its dataset's chain (unchanged when no chain applies)."""
        image = data.get(self.image_key)
        kind = "volumes" if isinstance(image, torch.Tensor) and image.ndim == 4 else "images"
        for lookup in (str(data.get(self.key, "")), kind, "*"):
            if lookup in self.transforms:
                chain = self.transforms[lookup]
                return dict(data) if chain is None else chain(dict(data))
        return dict(data)


class SplitSlicesd(MapTransform):
    """Cut a channel-first volume ``(C, X, Y, Z)`` into 2-D slice items; 2-D items keep their pixels.

    Only slices whose ``label_key`` has at least ``min_foreground`` foreground pixels are kept (MedSAM derives
    its box prompt from the mask), unless the item lists the slice indices to keep under ``slices_key``. Each
    slice item keeps the other entries of the volume item and gains ``name`` (``<volume>_sNNN``), ``volume``,
    ``slice_index`` and ``slice_axis``; its tensors get a 2-D affine with the in-plane spacing. 2-D items get the
    same keys where they lack them (``name`` from the file, ``volume`` = ``name``, ``slice_index`` 0), so a dataset
    that mixes 2-D images and volumes (a MONAI Label datastore, or several data roots) batches.

    Args:
        keys: keys of the volume and its label.
        label_key: key of the binary label deciding which slices hold the structure.
        axis: spatial axis to cut along (0, 1 or 2); an item's own ``slice_axis`` entry takes precedence.
        slices_key: item key listing the slice indices to keep (e.g. a calibration subset), if any.
        min_foreground: minimum foreground pixels of a kept slice.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        label_key: str = "label",
        axis: int = 2,
        slices_key: str = "slices",
        min_foreground: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if axis not in (0, 1, 2):
            raise ValueError(f"slice axis must be 0, 1 or 2, got {axis}")
        self.label_key, self.axis, self.slices_key = label_key, int(axis), slices_key
        self.min_foreground = int(min_foreground)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any] | list[dict[Hashable, Any]]:
        """The item itself (2-D) or one item per kept slice (3-D)."""
        label = data[self.label_key]
        if label.ndim != 4:  # channel + two spatial axes: already a 2-D sample
            return self._plane(data)
        axis = int(data.get("slice_axis", self.axis))
        volume = str(data.get("volume") or data.get("name") or volume_name(_filename(data[self.keys[0]])))
        return [self._slice(data, axis, index, volume) for index in self._indices(data, label, axis)]

    def _indices(self, data: Mapping[Hashable, Any], label: torch.Tensor, axis: int) -> list[int]:
        if data.get(self.slices_key) is not None:
            return [int(i) for i in data[self.slices_key]]
        other = tuple(a for a in (1, 2, 3) if a != axis + 1)
        counts = (torch.as_tensor(label) > 0).sum(dim=(0, *other))
        return [int(i) for i in torch.nonzero(counts >= self.min_foreground).flatten()]

    def _plane(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """A 2-D item with the keys slices have, so 2-D images and volume slices batch together.

        A 2-D image is its own group (``volume`` = its name) and its only plane (``slice_index`` 0).
        """
        item = dict(data)
        name = str(item.get("name") or volume_name(_filename(data[self.keys[0]])))
        item.setdefault("name", name)
        item.setdefault("volume", name)
        item.setdefault("slice_index", 0)
        item.setdefault("slice_axis", self.axis)
        return item

    def _slice(self, data: Mapping[Hashable, Any], axis: int, index: int, volume: str) -> dict[Hashable, Any]:
        item = {k: v for k, v in data.items() if k != self.slices_key}
        for key in self.key_iterator(item):
            item[key] = _take_slice(data[key], axis, index)
        item.update(name=slice_name(volume, index), volume=volume, slice_index=index, slice_axis=axis)
        return item


def _filename(tensor: Any) -> str:
    return str(tensor.meta.get("filename_or_obj", "volume")) if isinstance(tensor, MetaTensor) else "volume"


def _take_slice(volume: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    plane = torch.as_tensor(volume).select(axis + 1, index).contiguous()
    if not isinstance(volume, MetaTensor):
        return plane
    spacing = [float(s) for s in volume.pixdim[:3]]
    in_plane = [s for a, s in enumerate(spacing) if a != axis]
    meta = {k: v for k, v in volume.meta.items() if k not in ("affine", "original_affine", "spatial_shape")}
    meta["spatial_shape"] = np.asarray(plane.shape[1:])
    meta["slice_index"], meta["slice_axis"] = index, axis
    affine = torch.diag(torch.tensor([*in_plane, 1.0], dtype=torch.float64))
    return MetaTensor(plane.as_tensor() if isinstance(plane, MetaTensor) else plane, affine=affine, meta=meta)
