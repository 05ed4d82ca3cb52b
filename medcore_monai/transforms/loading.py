"""MONAI's ``LoadImaged`` with one clear error per unreadable file, and a check that values are finite.

When a file cannot be read, ``LoadImaged`` tries every other registered reader and raises one ``RuntimeError``
listing all of their failures (nibabel's, numpy's, ...), which buries the reason. :class:`ReadImaged` loads the
same way and, on failure, raises a :class:`~medcore_monai.data.errors.DataError` naming the file and what is wrong
with it, read with the reader that owns its format. A NaN or infinite value (a corrupt or badly converted volume)
would flow through every scaling step and come out as a NaN prediction or metric; :class:`EnsureFinited` (which
:class:`ReadImaged` applies itself) stops it at the file instead.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import torch
from monai.transforms import LoadImaged, MapTransform

from ..data.errors import DataError
from ..data.io import IMAGE_SUFFIXES_2D, read_image_2d
from ..data.readers import Image2DReader

__all__ = ["EnsureFinited", "ReadImaged"]


def _reason(path: str) -> str | None:
    """Why ``path`` cannot be read by the reader of its format, or ``None`` when it can."""
    if not Path(path).is_file():
        return f"file not found: {path}"
    if Path(path).suffix.lower() in IMAGE_SUFFIXES_2D:
        try:
            read_image_2d(path)
        except DataError as error:
            return str(error)
        return None
    try:
        import nibabel as nib

        nib.load(path).get_fdata()
    except Exception as error:  # noqa: BLE001 - nibabel raises many types for bad files
        return f"cannot read {path}: {error}"
    return None


class ReadImaged(LoadImaged):
    """``LoadImaged`` (2-D files through :class:`Image2DReader`, volumes through nibabel) with clear errors.

    Accepts ``LoadImaged``'s arguments; ``reader`` defaults to :class:`Image2DReader`.
    """

    def __init__(self, keys: Any, reader: Any = None, **kwargs: Any) -> None:
        super().__init__(keys, reader=reader if reader is not None else Image2DReader(), **kwargs)

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        """Load every key; an unreadable file, or an image and mask of different sizes, raise one ``DataError``."""
        try:
            loaded = super().__call__(data, reader)
        except (RuntimeError, OSError, ValueError) as error:
            for key in self.key_iterator(dict(data)):
                value = data[key]
                reason = _reason(str(value)) if isinstance(value, (str, Path)) else None
                if reason is not None:
                    raise DataError(reason) from None
            raise error
        _check_same_size(loaded, [key for key in self.key_iterator(loaded)], data)
        return _ensure_finite(loaded, list(self.key_iterator(loaded)))


class EnsureFinited(MapTransform):
    """Refuse images holding NaN or infinite values, naming the file and how many values are affected."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return the data unchanged when every key is finite.

        Raises:
            DataError: naming the file of the first key with a non-finite value.
        """
        d = dict(data)
        return _ensure_finite(d, list(self.key_iterator(d)))


def _ensure_finite(data: dict[Hashable, Any], keys: list[Hashable]) -> dict[Hashable, Any]:
    for key in keys:
        values = torch.as_tensor(data[key])
        if values.is_floating_point() and not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            meta = getattr(data[key], "meta", {}) or {}
            source = meta.get("filename_or_obj") or key
            raise DataError(f"{source} holds {bad} NaN or infinite values of {values.numel()}; fix or exclude it")
    return data


def _check_same_size(loaded: Mapping[Hashable, Any], keys: list[Hashable], sources: Mapping[Hashable, Any]) -> None:
    """Every loaded key must have the same spatial size (an image and its mask), else one ``DataError``."""
    shapes = {key: tuple(loaded[key].shape[1:]) for key in keys}
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{sources.get(key, key)} is {shape}" for key, shape in shapes.items())
        raise DataError(f"image and mask sizes differ: {described}")
