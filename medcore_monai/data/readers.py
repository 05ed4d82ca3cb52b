"""A MONAI ``ImageReader`` for 2-D image files, so ``LoadImaged`` reads them the way MedSAM did.

MONAI's ``PILReader`` swaps the two spatial axes by default, expands nothing from palettes and truncates 16-bit
RGB TIFFs to 8 bits. :class:`Image2DReader` wraps :func:`medcore_monai.data.io.read_image_2d` instead: arrays keep
their stored ``(rows, columns)`` order (MedSAM's orientation), palettes become colours, deep TIFFs keep their
depth, and every fault names the file. NIfTI and other volume formats are left to MONAI's own readers: this reader
are handed to MONAI's ``NibabelReader``, so one ``LoadImaged(reader=Image2DReader())`` reads photos and volumes
alike (MONAI tries a user-given reader on every file, whatever its suffix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, ensure_tuple

from .io import IMAGE_SUFFIXES_2D, read_image_2d

__all__ = ["Image2DReader"]


def _is_2d(names: Sequence[str | Path] | str | Path) -> bool:
    return all(Path(str(name)).suffix.lower() in IMAGE_SUFFIXES_2D for name in ensure_tuple(names))


class _Volume:
    """What NibabelReader read, tagged so :meth:`Image2DReader.get_data` hands it back to that reader."""

    def __init__(self, image: Any) -> None:
        self.image = image


class Image2DReader(ImageReader):
    """Read PNG, JPEG, BMP and TIFF files as ``(H, W)`` or channel-last ``(H, W, C)`` arrays; NIfTI via nibabel.

    For 2-D files the metadata gives ``spatial_shape`` ``(H, W)``, ``original_channel_dim`` (``-1`` for colour,
    none for grey, as ``EnsureChannelFirstd`` expects) and an identity affine, so distances are in pixels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.volumes = NibabelReader()

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        """Whether the file(s) are 2-D images or volumes nibabel reads."""
        return _is_2d(filename) or self.volumes.verify_suffix(filename)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any) -> list[np.ndarray] | _Volume:
        """Decode the file(s); :class:`~medcore_monai.data.errors.DataError` names a bad 2-D file."""
        if not _is_2d(data):
            return _Volume(self.volumes.read(data, **kwargs))
        return [read_image_2d(name) for name in ensure_tuple(data)]

    def get_data(self, img: Sequence[np.ndarray] | _Volume) -> tuple[np.ndarray, dict[str, Any]]:
        """The array (several files are stacked on a new first axis) and its metadata."""
        if isinstance(img, _Volume):
            return self.volumes.get_data(img.image)
        arrays = list(img)
        first = arrays[0]
        spatial = np.asarray(first.shape[:2])
        meta = {
            MetaKeys.SPATIAL_SHAPE: spatial,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if first.ndim == 3 else float("nan"),
            MetaKeys.AFFINE: np.eye(3),
            MetaKeys.ORIGINAL_AFFINE: np.eye(3),
        }
        data = first if len(arrays) == 1 else np.stack(arrays)
        return data, meta
