"""Box prompts as an image channel, for serving MedSAM through MONAI Label's ``BundleInferTask``.

MONAI Label hands the network only ``data["image"]``, so the request's box has to travel inside the
image tensor. The pre-processing of ``bundle/configs/inference.yaml`` is::

    LoadImaged -> EnsureChannelFirstd -> EnsureSpatial2Dd(allow_volumes) -> intensity (volumes)
    -> EnsureThreeChanneld -> BoxToChanneld -> transpose (2-D images only)

and :class:`medcore_monai.inferers.BoxChannelInferer` then brings each 2-D plane to the model size; the
post-processing ends with :class:`RestoreLoadedShaped`.

Coordinates. A request's ``roi`` is ``[x0, y0, x1, y1]`` for a 2-D image and ``[x0, y0, x1, y1, z0, z1]`` for a
volume (MONAI Label's SAM2 order), in the index space of the image as MONAI loads it: ``x``, ``y`` and ``z`` index
spatial axes 0, 1 and 2, and the ends are exclusive, which is how MONAI Label's SAM2 task reads ``roi`` (it draws
``roi[0]:roi[2], roi[1]:roi[3]`` on slices ``roi[4]:roi[5]``). MONAI's PIL reader stores 2-D files transposed
(axis 0 = column), so for PNG/JPG files this is the usual pixel ``(x = column, y = row)``; for NIfTI files they are
voxel indices ``(i, j, k)``. The box is drawn at the native size *before* any spatial transform, so transposing and
resizing treat box and image identically.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..data.errors import DataError

__all__ = ["BoxToChanneld", "EnsureSpatial2Dd", "RestoreLoadedShaped", "box_mask", "parse_box"]

_SPATIAL_DIMS = 2
_VOLUME_DIMS = 3
# roi value order per spatial dimensionality: (start, end) positions of each axis in the flat list
_BOX_LAYOUT = {2: ((0, 2), (1, 3)), 3: ((0, 2), (1, 3), (4, 5))}
_BOX_FORMAT = {2: "[x0, y0, x1, y1]", 3: "[x0, y0, x1, y1, z0, z1]"}


def _plain(tensor: Any) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


def _like(tensor: torch.Tensor, template: Any) -> torch.Tensor:
    """``tensor`` with a copy of ``template``'s metadata (MONAI Label's ``Restored`` reads it later)."""
    if isinstance(template, MetaTensor):
        return MetaTensor(tensor, meta=dict(template.meta))
    return tensor


# --------------------------------------------------------------------------- box validation


def _is_missing(box: Any) -> bool:
    # MONAI Label clients send "roi": [] when no box was drawn.
    if box is None:
        return True
    return (box.numel() if isinstance(box, torch.Tensor) else np.size(box)) == 0


def parse_box(box: Any, spatial_shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Validate a box and turn it into integer index bounds ``((start, end), ...)`` per spatial axis.

    Starts are floored and ends ceiled (a fractional box covers every pixel it touches); the result is clipped to
    the image.

    Args:
        box: ``[x0, y0, x1, y1]`` for a 2-D image, ``[x0, y0, x1, y1, z0, z1]`` for a volume; ``x``, ``y``, ``z``
            index spatial axes 0, 1, 2; ends exclusive.
        spatial_shape: ``(X, Y)`` or ``(X, Y, Z)`` of the image.

    Returns:
        ``((x0, x1), (y0, y1))`` or ``((x0, x1), (y0, y1), (z0, z1))`` with ``0 <= start < end <= size``.

    Raises:
        DataError: (a ``ValueError``) if the box has the wrong number of values for the image, non-finite values, an
            empty or inverted extent, or lies entirely outside the image.
    """
    dims = len(spatial_shape)
    if dims not in _BOX_LAYOUT:
        raise DataError(f"box prompts need a 2-D image or a volume, got spatial shape {tuple(spatial_shape)}")
    layout, fmt = _BOX_LAYOUT[dims], _BOX_FORMAT[dims]
    try:
        values = np.asarray(_plain(box) if isinstance(box, torch.Tensor) else box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DataError(f"box prompt must be numbers {fmt}, got {box!r}") from None
    if values.size != 2 * dims:
        kind = "2-D image" if dims == _SPATIAL_DIMS else "volume"
        raise DataError(f"box prompt for a {kind} must be {2 * dims} numbers {fmt}, got {values.size}: {box!r}")
    if not np.all(np.isfinite(values)):
        raise DataError(f"box prompt has non-finite values: {box!r}")
    extents = [(values[a], values[b]) for a, b in layout]
    if not all(start < end for start, end in extents):
        raise DataError(f"box prompt {fmt} needs every start below its end, got {box!r}")
    bounds = tuple(
        (max(0, math.floor(start)), min(int(size), math.ceil(end)))
        for (start, end), size in zip(extents, spatial_shape)
    )
    if not all(start < end for start, end in bounds):
        shape = " x ".join(str(int(s)) for s in spatial_shape)
        raise DataError(f"box prompt {box!r} lies outside the image of size {shape} (index order x, y, z)")
    return bounds


def box_mask(box: Any, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A float32 ``(1, *spatial_shape)`` mask that is 1 inside the box; all zeros when ``box`` is missing.

    Args:
        box: see :func:`parse_box`, or ``None`` / empty for no box.
        spatial_shape: ``(X, Y)`` or ``(X, Y, Z)`` of the image.
    """
    mask = torch.zeros((1, *(int(s) for s in spatial_shape)), dtype=torch.float32)
    if not _is_missing(box):
        region = tuple(slice(start, end) for start, end in parse_box(box, spatial_shape))
        mask[(0, *region)] = 1.0
    return mask


# --------------------------------------------------------------------------- pre-processing


class EnsureSpatial2Dd(MapTransform):
    """Drop trailing singleton spatial axes, so a 2-D image stored as ``X x Y x 1`` (NIfTI) is 2-D.

    With ``allow_volumes`` a volume ``(C, X, Y, Z)`` passes unchanged; without it, it is refused. The loaded
    ``spatial_shape`` in the metadata is left as it was (MONAI Label's ``Restored`` reads it).
    """

    def __init__(
        self, keys: KeysCollection = ("image",), allow_volumes: bool = False, allow_missing_keys: bool = False
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first images.
            allow_volumes: Let 3-D volumes through (served slice by slice) instead of refusing them.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.allow_volumes = allow_volumes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Squeeze every key to ``(C, X, Y)`` (or leave a volume ``(C, X, Y, Z)`` with ``allow_volumes``).

        Raises:
            ValueError: for an image with more spatial axes than allowed.
        """
        d = dict(data)
        most = 1 + (_VOLUME_DIMS if self.allow_volumes else _SPATIAL_DIMS)
        for key in self.key_iterator(d):
            image = _plain(d[key])
            while image.ndim > 1 + _SPATIAL_DIMS and image.shape[-1] == 1:
                image = image[..., 0]
            if not 1 + _SPATIAL_DIMS <= image.ndim <= most:
                allowed = "2-D images or 3-D volumes" if self.allow_volumes else "2-D images"
                raise DataError(
                    f"{key!r} has shape {tuple(d[key].shape)} (channel first); this bundle segments {allowed}"
                )
            d[key] = _like(image, d[key])
        return d


class BoxToChanneld(MapTransform):
    """Append the box prompt of ``box_key`` to the image as a binary last channel, at native size.

    Runs before any spatial transform so those move the box with the image. The box is ``[x0, y0, x1, y1]`` for a
    2-D image and ``[x0, y0, x1, y1, z0, z1]`` for a volume, in the loaded image's index space (see the module
    docstring). For a 2-D image a missing or empty box gives an all-zero channel, which
    :class:`medcore_monai.networks.prompt_channel.BoxChannelMedSAM` reads as the whole image; a volume needs a box
    (it says which slices to segment).
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        box_key: str = "roi",
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first images ``(C, X, Y)`` or volumes ``(C, X, Y, Z)``.
            box_key: Key of the box prompt (MONAI Label's request key is ``roi``).
            allow_missing_keys: Skip absent image keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the box channel to every key.

        Raises:
            ValueError: for an invalid box (see :func:`parse_box`), a volume without a box, or an image that is
                neither 2-D nor 3-D.
        """
        d = dict(data)
        box = d.get(self.box_key)
        for key in self.key_iterator(d):
            image = _plain(d[key])
            if image.ndim not in (1 + _SPATIAL_DIMS, 1 + _VOLUME_DIMS):
                raise DataError(f"{key!r} must be channel-first 2-D or 3-D, got {tuple(image.shape)}")
            if image.ndim == 1 + _VOLUME_DIMS and _is_missing(box):
                raise DataError(
                    f"a volume needs a box prompt {self.box_key} = [x0, y0, x1, y1, z0, z1] (voxel indices, ends "
                    "exclusive) saying which slices to segment"
                )
            mask = box_mask(box, image.shape[1:]).to(device=image.device, dtype=image.dtype)
            d[key] = _like(torch.cat([image, mask]), d[key])
        return d


# --------------------------------------------------------------------------- post-processing


class RestoreLoadedShaped(MapTransform):
    """Give a single-channel prediction the loaded image's spatial shape, without the channel axis.

    MONAI Label's ``Restored`` drops the channel only of 4-D results and compares the trailing axes with the loaded
    ``spatial_shape``: a ``[1, X, Y]`` mask would stay 3-D and be written as a ``1 x X`` image. This returns
    ``[X, Y]`` for a 2-D image, ``[X, Y, 1]`` for one stored with a trailing singleton axis (NIfTI) and
    ``[X, Y, Z]`` for a volume, so ``Restored`` finds nothing to change.
    """

    def __init__(self, keys: KeysCollection = ("pred",), ref_key: str = "image", allow_missing_keys: bool = False):
        """Create the transform.

        Args:
            keys: Keys of ``[1, *spatial]`` predictions at the loaded resolution.
            ref_key: Key of the pre-processed image, whose metadata holds ``spatial_shape``.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Reshape every key to the loaded ``spatial_shape``.

        Raises:
            KeyError: if the reference image carries no ``spatial_shape``.
            ValueError: if a prediction has more than one channel or another number of elements.
        """
        d = dict(data)
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else d.get(f"{self.ref_key}_meta_dict", {})
        if "spatial_shape" not in meta:
            raise KeyError(f"{self.ref_key!r} carries no 'spatial_shape' metadata; load it with LoadImaged")
        shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] != 1 or math.prod(pred.shape) != math.prod(shape):
                raise ValueError(f"cannot give the prediction {tuple(pred.shape)} the loaded shape {shape}")
            d[key] = pred.reshape(shape)
        return d
