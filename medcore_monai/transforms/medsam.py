"""MedSAM preprocessing as MONAI dictionary transforms.

The pipeline reproduces MedSAM's inference preprocessing: three-channel image, bicubic
anti-aliased resize to ``size x size`` ignoring the aspect ratio, per-image min-max scaling
to [0, 1], a binary mask resized nearest-neighbour to the model size and to the decoder's
low-resolution size (``size // 4``), and a box prompt ``[x0, y0, x1, y1]`` (x = column) from
the model-size mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Randomizable

from medcore_monai.data.errors import DataError
from medcore_monai.data.io import read_image_2d
from medcore_monai.geometry import EMPTY_MASK_POLICIES, box_from_mask, min_max_scale, resize_image, resize_mask

__all__ = [
    "EMPTY_MASK_POLICIES",
    "BinarizeMaskd",
    "BoxFromMaskd",
    "EnsureThreeChanneld",
    "LoadImage2Dd",
    "MinMaxScaled",
    "RandBoxFromMaskd",
    "ResizeForSAMd",
    "binarize_mask",
    "box_from_mask",
    "jitter_seed",
    "medsam_preprocess",
    "min_max_scale",
]

_LOWRES_FACTOR = 4
_RGB = 3
_GREY_ALPHA = 2
_RGBA = 4


def _source_of(value: Any, fallback: str) -> str:
    """Best available description of where a tensor came from, for error messages."""
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", fallback))
    return fallback


def _like(tensor: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Wrap ``tensor`` with a copy of ``template``'s metadata when ``template`` carries any."""
    if isinstance(template, MetaTensor):
        return MetaTensor(tensor, meta=dict(template.meta))
    return tensor


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """The data without MONAI metadata, so that arithmetic does not trace operations."""
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else torch.as_tensor(tensor)


# --------------------------------------------------------------------------- loading


def _channel_first(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


class LoadImage2Dd(MapTransform):
    """Load 2-D images and masks into channel-first float32 :class:`monai.data.MetaTensor`.

    Paths are read with :func:`medcore_monai.data.read_image_2d` (stored ``(H, W, C)`` becomes
    ``(C, H, W)``). Arrays and tensors already in the dictionary are used as they are: 2-D ones
    gain a channel axis, 3-D ones are taken to be channel-first already.

    Each loaded value's ``meta`` holds ``filename_or_obj``, ``original_shape`` ``(H, W)`` and
    ``spacing`` (the dictionary's ``spacing`` entry, else ``(1.0, 1.0)``). The dictionary also
    gets top-level ``original_shape`` (int64 tensor ``[2]``) and ``spacing`` (float32 tensor
    ``[2]``) so they survive collation and disk caching, which drop tensor metadata.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        spacing_key: str = "spacing",
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the loader.

        Args:
            keys: Keys holding paths or arrays; all of them must have the same ``(H, W)``.
            spacing_key: Key of the in-plane pixel spacing (mm, ordered like the array axes).
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load every key and record the native geometry."""
        d = dict(data)
        spacing = tuple(float(s) for s in d.get(self.spacing_key, (1.0, 1.0)))
        if len(spacing) != 2:
            raise DataError(f"Expected two in-plane spacings for {d.get('name', '<item>')}, got {spacing}")
        for key in self.key_iterator(d):
            d[key] = self._load(d[key], self._describe(d, key), spacing)
        loaded = [d[key] for key in self.key_iterator(d)]
        _check_same_size(loaded)
        if loaded:
            d["original_shape"] = torch.tensor(loaded[0].meta["original_shape"], dtype=torch.int64)
            d[self.spacing_key] = torch.tensor(spacing, dtype=torch.float32)
        return d

    @staticmethod
    def _describe(d: Mapping[Hashable, Any], key: Hashable) -> str:
        value = d[key]
        if isinstance(value, (str, Path)):
            return str(value)
        # Slices cut from volumes keep their source path under "<key>_path".
        path, name = d.get(f"{key}_path"), d.get("name")
        if path is not None and name is not None:
            return f"{path} [{name}]"
        return str(path or name or f"<{key} array>")

    @staticmethod
    def _load(value: Any, source: str, spacing: tuple[float, ...]) -> MetaTensor:
        if isinstance(value, (str, Path)):
            array = _channel_first(read_image_2d(value))
        else:
            array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.ndim == 2:
                array = array[None]
            if array.ndim != 3:
                raise DataError(f"Expected a 2-D or channel-first 3-D array for {source}, got {array.shape}")
        # A copy: the source may be read-only (decoded files) or shared with the caller's item.
        tensor = torch.tensor(array, dtype=torch.float32)
        meta = {
            "filename_or_obj": source,
            "original_shape": tuple(int(s) for s in array.shape[1:]),
            "spacing": spacing,
        }
        return MetaTensor(tensor, meta=meta)


def _check_same_size(loaded: Sequence[MetaTensor]) -> None:
    if not loaded:
        return
    reference = loaded[0]
    for other in loaded[1:]:
        if other.meta["original_shape"] != reference.meta["original_shape"]:
            raise DataError(
                f"Size mismatch: {reference.meta['filename_or_obj']} is {reference.meta['original_shape']} "
                f"but {other.meta['filename_or_obj']} is {other.meta['original_shape']} (H, W)"
            )


# --------------------------------------------------------------------------- channels and values


class EnsureThreeChanneld(MapTransform):
    """Make images three-channel: grey is replicated, alpha channels are dropped."""

    def __init__(self, keys: KeysCollection = ("image",), allow_missing_keys: bool = False) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first images with 1 (grey), 2 (grey + alpha), 3 or 4 (RGBA) channels.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Convert every key to three channels."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(_three_channels(_plain(d[key]), _source_of(d[key], str(key))), d[key])
        return d


def _three_channels(image: torch.Tensor, source: str) -> torch.Tensor:
    channels = image.shape[0]
    if channels == _RGB:
        return image
    if channels in (1, _GREY_ALPHA):
        return image[:1].repeat(_RGB, *([1] * (image.ndim - 1)))  # 2-D images and volumes alike
    if channels == _RGBA:
        return image[:_RGB]
    raise DataError(f"Cannot make a three-channel image from {channels} channels in {source}")


class BinarizeMaskd(MapTransform):
    """Turn masks into single-channel float32 0/1 masks.

    Only the first channel is used (JPEG and RGB masks store the same value in every channel).
    Without ``label_value`` the threshold is 0.5 for masks whose maximum is <= 1 (0/1 masks) and
    127 otherwise (0/255 and lossy JPEG masks); a multi-label mask with small integer labels
    therefore needs ``label_value``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("label",),
        label_value: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of channel-first masks.
            label_value: If given, foreground is exactly this value (one label of a multi-label mask).
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)
        self.label_value = label_value

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Binarise every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(binarize_mask(d[key], self.label_value), d[key])
        return d


def binarize_mask(mask: torch.Tensor, label_value: float | None = None) -> torch.Tensor:
    """Binarise a channel-first mask (see :class:`BinarizeMaskd`); returns float32 ``(1, H, W)``."""
    first = _plain(mask)[:1]
    if label_value is not None:
        return (first == label_value).to(torch.float32)
    threshold = 0.5 if first.numel() == 0 or float(first.max()) <= 1 else 127.0
    return (first > threshold).to(torch.float32)


class MinMaxScaled(MapTransform):
    """Scale each image to [0, 1] with its own minimum and maximum over all channels jointly."""

    def __init__(self, keys: KeysCollection = ("image",), allow_missing_keys: bool = False) -> None:
        """Create the transform.

        Args:
            keys: Keys of images to scale.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
        """
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Scale every key."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = _like(min_max_scale(_plain(d[key])), d[key])
        return d


# --------------------------------------------------------------------------- resizing


class ResizeForSAMd(MapTransform):
    """Resize image and mask to the model size, and the mask also to the decoder's output size.

    The image is resized bicubically with anti-aliasing (``skimage.transform.resize``, order 3,
    ``preserve_range=True``) to ``size x size`` regardless of aspect ratio, as MedSAM does. The
    mask is resized nearest-neighbour from its native resolution both to ``size`` (``label_key``)
    and to the decoder's output size (``lowres_key``): ``size // 4`` for SAM's ViT, ``size`` for
    LiteMedSAM (its 64x64 embedding at 256 px gives 256x256 logits). Metadata (native shape, spacing,
    file name) is kept.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        size: int = 1024,
        lowres_key: str = "label_lowres",
        allow_missing_keys: bool = False,
        lowres_size: int | None = None,
    ) -> None:
        """Create the transform.

        Args:
            image_key: Key of the channel-first image.
            label_key: Key of the binary ``(1, H, W)`` mask.
            size: Model input size (1024 for SAM ViT-B); must be a multiple of 4.
            lowres_key: Key receiving the mask at the decoder's output size.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.
            lowres_size: The decoder's output size (a model's ``MedSAM.low_res_size``); ``None`` for SAM's
                ``size // 4``.
        """
        super().__init__((image_key, label_key), allow_missing_keys)
        if size < _LOWRES_FACTOR or size % _LOWRES_FACTOR:
            raise ValueError(f"size must be a positive multiple of {_LOWRES_FACTOR}, got {size}")
        if lowres_size is not None and int(lowres_size) < 1:
            raise ValueError(f"lowres_size must be positive, got {lowres_size}")
        self.image_key, self.label_key, self.lowres_key = image_key, label_key, lowres_key
        self.size = size
        self.lowres_size = int(lowres_size) if lowres_size is not None else size // _LOWRES_FACTOR

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Resize the image and produce the model-size and low-resolution masks."""
        d = dict(data)
        if self.image_key in d:
            image = d[self.image_key]
            d[self.image_key] = _like(resize_image(_plain(image), self.size), image)
        if self.label_key in d:
            mask = d[self.label_key]
            d[self.label_key] = _like(resize_mask(_plain(mask), self.size), mask)
            d[self.lowres_key] = _like(resize_mask(_plain(mask), self.lowres_size), mask)
        elif not self.allow_missing_keys:
            raise KeyError(f"Key {self.label_key!r} not found")
        return d


# --------------------------------------------------------------------------- box prompts


def jitter_seed(seed: int, name: str) -> int:
    """Per-sample RNG seed: the first 8 bytes (big-endian) of SHA-256 of ``f"{seed}:{name}"``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def _check_box_args(bbox_shift: int, empty_mask: str) -> None:
    if bbox_shift < 0:
        raise ValueError(f"bbox_shift must be >= 0, got {bbox_shift}")
    if empty_mask not in EMPTY_MASK_POLICIES:
        raise ValueError(f"empty_mask must be one of {EMPTY_MASK_POLICIES}, got {empty_mask!r}")


def _mask_source(d: Mapping[Hashable, Any], label_key: str) -> str:
    name = d.get("name")
    source = _source_of(d[label_key], str(name) if name is not None else label_key)
    return f"{source} [{name}]" if name is not None and str(name) not in source else source


class BoxFromMaskd(MapTransform):
    """Box prompt from the model-size mask, with optional jitter that is reproducible per sample.

    With ``deterministic=True`` (evaluation) the jitter of a sample depends only on ``seed`` and
    its ``name`` (see :func:`jitter_seed`), so it does not change with dataset order, workers or
    caching. With ``deterministic=False`` the jitter comes from one generator seeded once with
    ``seed`` and therefore depends on the order samples are seen; prefer :class:`RandBoxFromMaskd`
    for training.
    """

    def __init__(
        self,
        label_key: str = "label",
        box_key: str = "box",
        bbox_shift: int = 0,
        seed: int = 0,
        deterministic: bool = True,
        empty_mask: str = "full_box",
        name_key: str = "name",
    ) -> None:
        """Create the transform.

        Args:
            label_key: Key of the model-size mask.
            box_key: Key receiving the float32 box ``[x0, y0, x1, y1]``.
            bbox_shift: Each side is enlarged by an independent integer drawn uniformly from
                ``[0, bbox_shift]``; 0 gives the tight box.
            seed: Jitter seed.
            deterministic: Seed the jitter per sample from ``seed`` and the sample name.
            empty_mask: Policy for masks that are empty at model size, see :func:`box_from_mask`.
            name_key: Key of the sample name used for the per-sample seed and error messages.
        """
        super().__init__((label_key,))
        _check_box_args(bbox_shift, empty_mask)
        self.label_key, self.box_key, self.name_key = label_key, box_key, name_key
        self.bbox_shift, self.seed, self.deterministic = bbox_shift, seed, deterministic
        self.empty_mask = empty_mask
        self._sequence_rng = np.random.default_rng(seed)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add the box prompt."""
        d = dict(data)
        shifts = self._draw_shifts(d)
        source = _mask_source(d, self.label_key)
        d[self.box_key] = box_from_mask(d[self.label_key], shifts, self.empty_mask, source)
        return d

    def _draw_shifts(self, d: Mapping[Hashable, Any]) -> np.ndarray:
        if self.bbox_shift == 0:
            return np.zeros(4, dtype=np.int64)
        if not self.deterministic:
            return self._sequence_rng.integers(0, self.bbox_shift, size=4, endpoint=True)
        if self.name_key not in d:
            raise KeyError(f"Deterministic box jitter needs the sample name under {self.name_key!r}")
        rng = np.random.default_rng(jitter_seed(self.seed, str(d[self.name_key])))
        return rng.integers(0, self.bbox_shift, size=4, endpoint=True)


class RandBoxFromMaskd(Randomizable, MapTransform):
    """Box prompt with random jitter for training; reproducible through ``set_random_state``."""

    def __init__(
        self,
        label_key: str = "label",
        box_key: str = "box",
        bbox_shift: int = 5,
        empty_mask: str = "full_box",
    ) -> None:
        """Create the transform.

        Args:
            label_key: Key of the model-size mask.
            box_key: Key receiving the float32 box ``[x0, y0, x1, y1]``.
            bbox_shift: Each side is enlarged by an independent integer drawn uniformly from
                ``[0, bbox_shift]``.
            empty_mask: Policy for masks that are empty at model size, see :func:`box_from_mask`.
        """
        MapTransform.__init__(self, (label_key,))
        _check_box_args(bbox_shift, empty_mask)
        self.label_key, self.box_key = label_key, box_key
        self.bbox_shift, self.empty_mask = bbox_shift, empty_mask
        self._shifts = np.zeros(4, dtype=np.int64)

    def randomize(self, data: Any = None) -> None:
        """Draw the four side enlargements."""
        self._shifts = self.R.randint(0, self.bbox_shift + 1, size=4)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Add a freshly jittered box prompt."""
        d = dict(data)
        self.randomize()
        source = _mask_source(d, self.label_key)
        d[self.box_key] = box_from_mask(d[self.label_key], self._shifts, self.empty_mask, source)
        return d


# --------------------------------------------------------------------------- pipeline


def medsam_preprocess(
    size: int = 1024,
    bbox_shift: int = 0,
    seed: int = 0,
    deterministic: bool = True,
    label_value: float | None = None,
    empty_mask: str = "full_box",
    lowres_size: int | None = None,
) -> Compose:
    """MedSAM preprocessing for items with ``image``/``label`` paths or arrays.

    Args:
        size: Model input size (1024 for MedSAM, 256 for tiny test models).
        bbox_shift: Maximum box jitter per side in model-size pixels.
        seed: Jitter seed (per-sample hash seed, or the random state of :class:`RandBoxFromMaskd`).
        deterministic: Per-sample deterministic jitter (evaluation, calibration) instead of a
            random transform (training). Everything before the box is deterministic either way,
            so caching datasets store it.
        label_value: Select one value of a multi-label mask (see :class:`BinarizeMaskd`).
        empty_mask: ``"full_box"`` or ``"error"`` for masks that are empty at model size.
        lowres_size: The decoder's output size (``None``: ``size // 4``, SAM's; LiteMedSAM's is ``size``).

    Returns:
        A Compose producing ``image`` float32 ``[3, S, S]`` in [0, 1], ``label`` float32
        ``[1, S, S]`` (0/1), ``label_lowres`` ``[1, S/4, S/4]``, ``box`` float32 ``[4]``, and
        carrying ``name``, ``original_shape`` (``[2]``, native H, W) and ``spacing`` (``[2]``, mm).

    Note:
        MONAI's Compose re-raises errors from its transforms as ``RuntimeError("applying transform
        ...")``; the :class:`DataError` naming the file is its ``__cause__``.
    """
    if deterministic:
        box: MapTransform = BoxFromMaskd(bbox_shift=bbox_shift, seed=seed, deterministic=True, empty_mask=empty_mask)
    else:
        box = RandBoxFromMaskd(bbox_shift=bbox_shift, empty_mask=empty_mask)
    pipeline = Compose(
        [
            LoadImage2Dd(keys=("image", "label")),
            EnsureThreeChanneld(keys=("image",)),
            BinarizeMaskd(keys=("label",), label_value=label_value),
            ResizeForSAMd(size=size, lowres_size=lowres_size),
            MinMaxScaled(keys=("image",)),
            box,
        ]
    )
    if isinstance(box, Randomizable):
        # Compose re-seeds its members from MONAI's global seed on construction, so seed afterwards.
        box.set_random_state(seed=seed)
    return pipeline
