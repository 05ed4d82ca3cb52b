"""Box prompts as an image channel, for serving MedSAM through MONAI Label's ``BundleInferTask``.

MONAI Label hands the network only ``data["image"]``, so the request's box has to travel inside the
image tensor. The pre-processing of ``bundle/configs/inference.yaml`` is::

    LoadImaged -> EnsureChannelFirstd -> EnsureSpatial2Dd -> EnsureThreeChanneld
    -> BoxToChanneld -> Transposed([0, 2, 1]) -> BoxInputForSAMd

and its post-processing starts with :class:`RestoreSpatialShaped`.

Coordinates. A request's ``roi`` is ``[x0, y0, x1, y1]`` in the index space of the image as MONAI
loads it: ``x`` indexes spatial axis 0 and ``y`` spatial axis 1, with ``x1``/``y1`` exclusive,
which is how MONAI Label's SAM2 task reads ``roi`` (it draws ``roi[0]:roi[2], roi[1]:roi[3]``).
MONAI's PIL reader stores 2-D files transposed (axis 0 = column), so for PNG/JPG files this is the
usual pixel ``(x = column, y = row)``. The box is drawn at the native size *before* any spatial
transform, so transposing and resizing treat box and image identically. The transpose brings both to
MedSAM's training orientation (rows first, as its NumPy/SimpleITK pre-processing had them); the
network then reads SAM's ``[x0, y0, x1, y1]`` (x = last axis) off the resized mask.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

# MedSAM's own resize; reusing it keeps served inputs identical to the ones the models were pruned and
# evaluated on.
from medcore_monai.geometry import min_max_scale, resize_image, resize_mask

__all__ = [
    "BoxInputForSAMd",
    "BoxToChanneld",
    "EnsureSpatial2Dd",
    "RestoreSpatialShaped",
    "box_mask",
    "parse_box",
]

_SPATIAL_DIMS = 2
_BOX_LENGTH = 4
_MIN_BOX_INPUT_CHANNELS = 2  # at least one image channel plus the box channel


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


def parse_box(box: Any, spatial_shape: Sequence[int]) -> tuple[int, int, int, int]:
    """Validate a box ``[x0, y0, x1, y1]`` and turn it into integer pixel bounds inside the image.

    Starts are floored and ends ceiled (a fractional box covers every pixel it touches); the result
    is clipped to the image.

    Args:
        box: Four numbers; ``x`` indexes spatial axis 0, ``y`` axis 1; ``x1``/``y1`` exclusive.
        spatial_shape: ``(X, Y)`` of the image.

    Returns:
        ``(x0, y0, x1, y1)`` with ``0 <= x0 < x1 <= X`` and ``0 <= y0 < y1 <= Y``.

    Raises:
        ValueError: if the box is not four finite numbers, is empty or inverted, or lies entirely
            outside the image.
    """
    try:
        values = np.asarray(_plain(box) if isinstance(box, torch.Tensor) else box, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"box prompt must be four numbers [x0, y0, x1, y1], got {box!r}") from None
    if values.size != _BOX_LENGTH:
        raise ValueError(
            f"box prompt must be four numbers [x0, y0, x1, y1] (a 2-D box), got {values.size} values: {box!r}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"box prompt has non-finite values: {box!r}")
    x0, y0, x1, y1 = values.tolist()
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box prompt [x0, y0, x1, y1] needs x0 < x1 and y0 < y1, got {box!r}")
    size_x, size_y = (int(s) for s in spatial_shape)
    bounds = (
        max(0, math.floor(x0)),
        max(0, math.floor(y0)),
        min(size_x, math.ceil(x1)),
        min(size_y, math.ceil(y1)),
    )
    if not (bounds[0] < bounds[2] and bounds[1] < bounds[3]):
        raise ValueError(f"box prompt {box!r} lies outside the image of size {size_x} x {size_y} (x, y)")
    return bounds


def box_mask(box: Any, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A float32 ``(1, X, Y)`` mask that is 1 inside the box; all zeros when ``box`` is missing.

    Args:
        box: ``[x0, y0, x1, y1]`` (see :func:`parse_box`), or ``None`` / empty for no box.
        spatial_shape: ``(X, Y)`` of the image.
    """
    mask = torch.zeros((1, *(int(s) for s in spatial_shape)), dtype=torch.float32)
    if not _is_missing(box):
        x0, y0, x1, y1 = parse_box(box, spatial_shape)
        mask[0, x0:x1, y0:y1] = 1.0
    return mask


# --------------------------------------------------------------------------- pre-processing


class EnsureSpatial2Dd(MapTransform):
    """Drop trailing singleton spatial axes, so a 2-D image stored as ``X x Y x 1`` (NIfTI) is 2-D.

    The loaded ``spatial_shape`` in the metadata is left as it was: :class:`RestoreSpatialShaped`
    gives the prediction that shape again.
    """

    def __init__(self, keys: KeysCollection = ("image",), allow_missing_keys: bool = False) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first images.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Squeeze every key to ``(C, X, Y)``.

        Raises:
            ValueError: for an image with more than two non-singleton spatial axes (a volume).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            image = _plain(d[key])
            while image.ndim > 1 + _SPATIAL_DIMS and image.shape[-1] == 1:
                image = image[..., 0]
            if image.ndim != 1 + _SPATIAL_DIMS:
                raise ValueError(
                    f"{key!r} has shape {tuple(d[key].shape)} (channel first); this bundle segments 2-D "
                    "images, so send a 2-D image or a single slice"
                )
            d[key] = _like(image, d[key])
        return d


class BoxToChanneld(MapTransform):
    """Append the box prompt of ``box_key`` to the image as a binary last channel, at native size.

    Runs before any spatial transform so those move the box with the image. The box is
    ``[x0, y0, x1, y1]`` in the loaded image's index space (x = spatial axis 0, exclusive ends;
    see the module docstring). A missing or empty ``box_key`` gives an all-zero channel, which
    :class:`medcore_monai.networks.prompt_channel.BoxChannelMedSAM` reads as the whole image.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        box_key: str = "roi",
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first 2-D images ``(C, X, Y)``.
            box_key: Key of the box prompt (MONAI Label's request key is ``roi``).
            allow_missing_keys: Skip absent image keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.box_key = box_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the box channel to every key.

        Raises:
            ValueError: for an invalid box (see :func:`parse_box`) or an image that is not 2-D.
        """
        d = dict(data)
        box = d.get(self.box_key)
        for key in self.key_iterator(d):
            image = _plain(d[key])
            if image.ndim != 1 + _SPATIAL_DIMS:
                raise ValueError(f"{key!r} must be channel-first 2-D (C, X, Y), got {tuple(image.shape)}")
            mask = box_mask(box, image.shape[1:]).to(device=image.device, dtype=image.dtype)
            d[key] = _like(torch.cat([image, mask]), d[key])
        return d


class BoxInputForSAMd(MapTransform):
    """Resize a box-channel input to the model size and scale its image channels, the MedSAM way.

    The image channels (all but the last) are resized bicubically with anti-aliasing and then
    min-max scaled to [0, 1], exactly as :class:`~medcore_monai.transforms.medsam.ResizeForSAMd` and
    :class:`~medcore_monai.transforms.medsam.MinMaxScaled` do; the box channel (the last) is resized
    nearest-neighbour, as masks are before MedSAM derives boxes from them.
    """

    def __init__(self, keys: KeysCollection = ("image",), size: int = 1024, allow_missing_keys: bool = False) -> None:
        """Create the transform.

        Args:
            keys: Keys of ``(C + 1, H, W)`` inputs whose last channel is the box mask.
            size: Model input size (256 for the tiny models, 1024 for ViT-B).
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        if int(size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.size = int(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize and scale every key to ``(C + 1, size, size)``."""
        d = dict(data)
        for key in self.key_iterator(d):
            x = _plain(d[key])
            if x.ndim != 1 + _SPATIAL_DIMS or x.shape[0] < _MIN_BOX_INPUT_CHANNELS:
                raise ValueError(f"{key!r} must be (C + 1, H, W) with a box channel last, got {tuple(x.shape)}")
            image = min_max_scale(resize_image(x[:-1], self.size))
            box = resize_mask(x[-1:], self.size)
            d[key] = _like(torch.cat([image, box]), d[key])
        return d


# --------------------------------------------------------------------------- post-processing


class RestoreSpatialShaped(MapTransform):
    """Resize model-size predictions back to the loaded image's spatial shape.

    The target is ``ref_key``'s ``meta["spatial_shape"]`` (the shape MONAI loaded, which MONAI
    Label's ``Restored`` also reads), so ``Restored`` finds nothing left to do. Logits are resized
    bilinearly before any threshold, as MedSAM upsamples its logits, and the pre-processing's
    transpose is undone. Trailing singleton axes of the loaded shape (``X x Y x 1`` NIfTI) are
    restored too.
    """

    def __init__(
        self,
        keys: KeysCollection = ("pred",),
        ref_key: str = "image",
        transposed: bool = True,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of ``(C, S, S)`` predictions.
            ref_key: Key of the pre-processed image, whose metadata holds ``spatial_shape``.
            transposed: The pre-processing transposed the two spatial axes (``Transposed([0, 2, 1])``).
            mode: ``torch.nn.functional.interpolate`` mode (``bilinear`` for logits, ``nearest`` for labels).
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.transposed, self.mode = ref_key, transposed, mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize every key to ``(C, *spatial_shape)``."""
        d = dict(data)
        shape = self._spatial_shape(d)
        plane = shape[:_SPATIAL_DIMS][::-1] if self.transposed else shape[:_SPATIAL_DIMS]
        # align_corners=False is MedSAM's upsampling; interpolate refuses the argument for nearest modes.
        align = False if self.mode in ("linear", "bilinear", "bicubic", "trilinear") else None
        for key in self.key_iterator(d):
            pred = _plain(d[key]).float()
            pred = F.interpolate(pred[None], size=plane, mode=self.mode, align_corners=align)[0]
            if self.transposed:
                pred = pred.transpose(-1, -2)
            pred = pred.reshape(pred.shape[0], *shape)
            d[key] = _like(pred.contiguous(), d[self.ref_key])
        return d

    def _spatial_shape(self, d: Mapping[Hashable, Any]) -> tuple[int, ...]:
        ref = d.get(self.ref_key)
        meta = ref.meta if isinstance(ref, MetaTensor) else d.get(f"{self.ref_key}_meta_dict", {})
        if "spatial_shape" not in meta:
            raise KeyError(f"{self.ref_key!r} carries no 'spatial_shape' metadata; load it with LoadImaged")
        shape = tuple(int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1))
        if len(shape) < _SPATIAL_DIMS or any(s != 1 for s in shape[_SPATIAL_DIMS:]):
            raise ValueError(f"cannot restore a 2-D prediction to the loaded shape {shape}")
        return shape
