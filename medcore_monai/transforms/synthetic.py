"""General (non-medical) box-prompted segmentation scenes, generated offline and deterministically per seed.

They stand in for SAM's natural-image training data when building a small general model (``sam-tiny``)
that a medical fine-tune can start from. Two kinds of scene:

* procedural: a textured background with several textured objects (ellipses, rings, star polygons,
  noise blobs, silhouettes) painted over each other, thin bars occluding them, then blur, noise and a
  gamma change. The visible part of one object is the target.
* natural: a random crop of a photograph shipped with scikit-image (astronaut, coffee, chelsea, rocket,
  camera, cat, clock, coins) whose regions come from Felzenszwalb's graph segmentation
  (coins: Otsu threshold and connected components); one region is the target.

No medical image is used. Each scene is a sample dict in the layout of
:func:`medcore_monai.transforms.medsam_preprocess`, so models train and evaluate on it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage import data as skdata
from skimage import draw
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk
from skimage.segmentation import felzenszwalb

from ..geometry import box_from_mask, min_max_scale

__all__ = [
    "NATURAL_IMAGES",
    "TEXTURE_IMAGES",
    "natural_scene",
    "procedural_scene",
    "synthetic_batch",
    "synthetic_scene",
]

# Photographs of everyday scenes and objects (the medical samples of skimage.data are left out on purpose).
NATURAL_IMAGES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "cat", "clock", "coins")
# Grey photographs of surfaces, used as fill patterns.
TEXTURE_IMAGES = ("grass", "gravel", "brick", "moon")

_LOWRES_FACTOR = 4
_MIN_AREA_FRACTION = 0.004  # ~260 px at 256 px: at least ~16 low-resolution pixels
_MAX_AREA_FRACTION = 0.6  # larger regions are background rather than objects
_MAX_ATTEMPTS = 20
_OCCLUDER = -1


# --------------------------------------------------------------------------- cached source images


@cache
def _texture_image(name: str) -> np.ndarray:
    """Grey texture photograph as float32 in [0, 1]."""
    image = np.asarray(getattr(skdata, name)(), dtype=np.float32)
    image = image.mean(-1) if image.ndim == 3 else image
    return (image - image.min()) / max(float(image.max() - image.min()), 1e-8)


@cache
def _horse_silhouette() -> np.ndarray:
    # skimage's horse is a black horse on white: the object is the False pixels.
    return ~np.asarray(skdata.horse(), dtype=bool)


@cache
def _natural_image(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A photograph (float32 ``[H, W, 3]`` in [0, 1]) and its region map (int32, 0 = not selectable)."""
    image = np.asarray(getattr(skdata, name)())
    if name == "coins":
        # The coins are bright on a dark table: each connected bright component is one coin.
        regions, _ = ndimage.label(closing(image > threshold_otsu(image), disk(2)))
    else:
        # felzenszwalb labels from 0; shift so that 0 stays free for "no region".
        regions = felzenszwalb(image, scale=300, sigma=0.8, min_size=300) + 1
    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    return rgb.astype(np.float32) / 255.0, regions.astype(np.int32)


# --------------------------------------------------------------------------- resizing helpers


def _resize(array: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a ``[C, H, W]`` array to ``shape`` (``bilinear`` with antialiasing, or ``nearest``)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if mode == "nearest":
        out = F.interpolate(tensor, size=shape, mode="nearest")
    else:
        out = F.interpolate(tensor, size=shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0].numpy()


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise ``[C, H, W]`` in [0, 1]: a ``cells x cells`` random grid upsampled bicubically."""
    grid = torch.from_numpy(rng.random((1, channels, cells, cells), dtype=np.float32))
    out = F.interpolate(grid, size=shape, mode="bicubic", align_corners=False)
    return out[0].clamp_(0.0, 1.0).numpy()


def _coordinates(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled so that the longer side spans [-1, 1]."""
    scale = 2.0 / max(shape)
    rows = (np.arange(shape[0], dtype=np.float32) - shape[0] / 2) * scale
    cols = (np.arange(shape[1], dtype=np.float32) - shape[1] / 2) * scale
    return cols[None, :], rows[:, None]


# --------------------------------------------------------------------------- textures


def _random_colour(rng: np.random.Generator, near: np.ndarray | None = None) -> np.ndarray:
    """An RGB colour; ``near`` gives a low-contrast variant of that colour (hard, camouflaged objects)."""
    if near is None:
        return rng.random(3, dtype=np.float32)
    return np.clip(near + rng.normal(0.0, 0.08, 3), 0.0, 1.0).astype(np.float32)


def _photo_pattern(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random crop of a texture photograph, ``[H, W]`` zero-mean."""
    texture = _texture_image(TEXTURE_IMAGES[rng.integers(len(TEXTURE_IMAGES))])
    crop = int(rng.integers(max(shape) // 4 + 1, min(texture.shape) + 1))
    top = int(rng.integers(texture.shape[0] - crop + 1))
    left = int(rng.integers(texture.shape[1] - crop + 1))
    patch = _resize(texture[None, top : top + crop, left : left + crop], (max(shape),) * 2, "bilinear")[0]
    patch = patch[: shape[0], : shape[1]]
    return patch - patch.mean()


def _stripes(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x, y = _coordinates(shape)
    angle = rng.uniform(0.0, np.pi)
    frequency = rng.uniform(2.0, 20.0)
    return np.sin(np.pi * frequency * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))


def _gradient(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x, y = _coordinates(shape)
    angle = rng.uniform(0.0, 2 * np.pi)
    return 0.5 * (x * np.cos(angle) + y * np.sin(angle))


def _random_texture(rng: np.random.Generator, shape: tuple[int, int], colour: np.ndarray) -> np.ndarray:
    """A ``[3, H, W]`` fill: a base colour plus a random mix of gradient, blotches, stripes, photo pattern, grain."""
    image = np.broadcast_to(colour[:, None, None], (3, *shape)).astype(np.float32)
    # Each component is drawn with its own probability so fills range from flat to busy.
    if rng.random() < 0.5:
        signs = rng.choice([-1.0, 1.0], 3).astype(np.float32)[:, None, None]
        image = image + rng.uniform(0.05, 0.4) * _gradient(rng, shape)[None] * signs
    if rng.random() < 0.6:
        cells = int(rng.integers(3, 24))
        image = image + rng.uniform(0.05, 0.35) * (_smooth_noise(rng, shape, cells, channels=3) - 0.5)
    if rng.random() < 0.25:
        tint = rng.uniform(0.3, 1.0, 3).astype(np.float32)[:, None, None]
        image = image + rng.uniform(0.05, 0.25) * _stripes(rng, shape)[None] * tint
    if rng.random() < 0.35:
        image = image + rng.uniform(0.2, 0.8) * _photo_pattern(rng, shape)[None]
    if rng.random() < 0.3:
        image = image + rng.uniform(0.01, 0.12) * rng.standard_normal((3, *shape), dtype=np.float32)
    return image.astype(np.float32)


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, colour: np.ndarray) -> np.ndarray:
    """Fill ``mask`` with a fresh texture; the texture is only drawn over the mask's bounding box (speed)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return image
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    texture = _random_texture(rng, (window[0].stop - window[0].start, window[1].stop - window[1].start), colour)
    out = image.copy()
    out[:, window[0], window[1]] = np.where(mask[window][None], texture, image[:, window[0], window[1]])
    return out


# --------------------------------------------------------------------------- shapes


def _ellipse(rng: np.random.Generator, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    centre = rng.uniform(0.1, 0.9, 2) * size
    radii = rng.uniform(0.04, 0.3, 2) * size
    rows, cols = draw.ellipse(
        centre[0], centre[1], radii[0], radii[1], shape=mask.shape, rotation=rng.uniform(0, np.pi)
    )
    mask[rows, cols] = True
    return mask


def _ring(rng: np.random.Generator, size: int) -> np.ndarray:
    """An annulus: an object with a hole, so the target is not always the filled box content."""
    mask = np.zeros((size, size), dtype=bool)
    centre = rng.uniform(0.2, 0.8, 2) * size
    outer = rng.uniform(0.08, 0.3) * size
    rows, cols = draw.disk(tuple(centre), outer, shape=mask.shape)
    mask[rows, cols] = True
    rows, cols = draw.disk(tuple(centre), outer * rng.uniform(0.35, 0.75), shape=mask.shape)
    mask[rows, cols] = False
    return mask


def _star_polygon(rng: np.random.Generator, size: int) -> np.ndarray:
    """A star-shaped polygon (triangles, boxes, irregular convex and concave outlines)."""
    mask = np.zeros((size, size), dtype=bool)
    vertices = int(rng.integers(3, 12))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, vertices))
    radius = rng.uniform(0.06, 0.3) * size
    radii = radius * rng.uniform(0.4 if rng.random() < 0.5 else 0.9, 1.0, vertices)
    centre = rng.uniform(0.15, 0.85, 2) * size
    rows = centre[0] + radii * np.sin(angles)
    cols = centre[1] + radii * np.cos(angles)
    rr, cc = draw.polygon(rows, cols, shape=mask.shape)
    mask[rr, cc] = True
    return mask


def _blob(rng: np.random.Generator, size: int) -> np.ndarray:
    """An irregular blob: smooth noise thresholded inside a soft ellipse, largest piece kept."""
    x, y = _coordinates((size, size))
    cx, cy = rng.uniform(-0.6, 0.6, 2)
    rx, ry = rng.uniform(0.1, 0.45, 2)
    falloff = 1.0 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2
    field = falloff + rng.uniform(0.5, 1.5) * (_smooth_noise(rng, (size, size), int(rng.integers(3, 9)))[0] - 0.5)
    return _largest_component(field > 0)


def _silhouette(rng: np.random.Generator, size: int) -> np.ndarray:
    """The skimage horse silhouette, scaled, flipped and placed at random."""
    horse = _horse_silhouette()
    side = int(rng.uniform(0.25, 0.7) * size)
    shape = _resize(horse[None].astype(np.float32), (side, side), "bilinear")[0] > 0.5
    if rng.random() < 0.5:
        shape = shape[:, ::-1]
    mask = np.zeros((size, size), dtype=bool)
    top, left = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, 2))
    rows, cols = slice(max(top, 0), min(top + side, size)), slice(max(left, 0), min(left + side, size))
    mask[rows, cols] = shape[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left]
    return mask


def _bar(rng: np.random.Generator, size: int) -> np.ndarray:
    """A long thin rotated bar, used as an occluder."""
    mask = np.zeros((size, size), dtype=bool)
    centre = rng.uniform(0.0, 1.0, 2) * size
    angle = rng.uniform(0.0, np.pi)
    half_length, half_width = rng.uniform(0.3, 0.8) * size, rng.uniform(0.005, 0.025) * size
    along = np.array([np.sin(angle), np.cos(angle)]) * half_length
    across = np.array([np.cos(angle), -np.sin(angle)]) * half_width
    corners = np.stack(
        [centre + along + across, centre + along - across, centre - along - across, centre - along + across]
    )
    rr, cc = draw.polygon(corners[:, 0], corners[:, 1], shape=mask.shape)
    mask[rr, cc] = True
    return mask


_SHAPES: tuple[tuple[Callable[[np.random.Generator, int], np.ndarray], float], ...] = (
    (_ellipse, 0.3),
    (_star_polygon, 0.3),
    (_blob, 0.25),
    (_ring, 0.08),
    (_silhouette, 0.07),
)


def _random_shape(rng: np.random.Generator, size: int) -> np.ndarray:
    weights = np.array([w for _, w in _SHAPES])
    shape_fn = _SHAPES[rng.choice(len(_SHAPES), p=weights / weights.sum())][0]
    return shape_fn(rng, size)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


# --------------------------------------------------------------------------- scenes


def _photometric(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Camera-like degradations: blur, gamma and sensor noise (min-max scaling follows in the caller)."""
    if rng.random() < 0.4:
        image = ndimage.gaussian_filter(image, sigma=(0.0, *([rng.uniform(0.5, 1.5)] * 2)))
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.5:
        image = image + rng.uniform(0.005, 0.05) * rng.standard_normal(image.shape, dtype=np.float32)
    return image.astype(np.float32)


def _selectable(instances: np.ndarray, size: int) -> list[int]:
    """Instance ids whose visible area makes a prompt target: not a speck, not the whole background."""
    min_area = _MIN_AREA_FRACTION * size * size
    ids, counts = np.unique(instances[instances > 0], return_counts=True)
    return [int(i) for i, c in zip(ids, counts) if min_area <= c <= _MAX_AREA_FRACTION * size * size]


def procedural_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Image ``[3, S, S]``, instance map ``[S, S]`` (0 background, -1 occluder) and the selectable ids."""
    background_colour = _random_colour(rng)
    image = _random_texture(rng, (size, size), background_colour)
    instances = np.zeros((size, size), dtype=np.int32)
    for index in range(1, int(rng.integers(2, 7)) + 1):
        mask = _random_shape(rng, size)
        camouflaged = rng.random() < 0.2
        colour = _random_colour(rng, near=background_colour if camouflaged else None)
        # Later objects cover earlier ones: the target is what stays visible, as in a photograph.
        image = _paint(image, mask, rng, colour)
        instances[mask] = index
    for _ in range(int(rng.integers(0, 3))):
        mask = _bar(rng, size)
        image = _paint(image, mask, rng, _random_colour(rng))
        instances[mask] = _OCCLUDER
    return _photometric(rng, image), instances, _selectable(instances, size)


def natural_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A random crop of a skimage photograph and its regions, same outputs as :func:`procedural_scene`."""
    photo, regions = _natural_image(NATURAL_IMAGES[rng.integers(len(NATURAL_IMAGES))])
    height, width = regions.shape
    crop = int(rng.uniform(0.5, 1.0) * min(height, width))
    top, left = int(rng.integers(height - crop + 1)), int(rng.integers(width - crop + 1))
    window = (slice(top, top + crop), slice(left, left + crop))
    image = _resize(np.moveaxis(photo[window], -1, 0), (size, size), "bilinear")
    instances = _resize(regions[window][None].astype(np.float32), (size, size), "nearest")[0].astype(np.int32)
    if rng.random() < 0.5:
        image, instances = image[:, :, ::-1], instances[:, ::-1]
    # A colour cast, so the few photographs do not look the same every time.
    image = image * rng.uniform(0.7, 1.3, 3).astype(np.float32)[:, None, None]
    return _photometric(rng, image), np.ascontiguousarray(instances), _selectable(instances, size)


def _lowres(label: torch.Tensor) -> torch.Tensor:
    """``[1, S/4, S/4]`` target for the decoder's low-resolution logits: majority of each 4x4 cell."""
    return (F.avg_pool2d(label[None], _LOWRES_FACTOR)[0] >= 0.5).to(torch.float32)


def synthetic_scene(seed: int, size: int = 256, bbox_shift: int = 0, natural_fraction: float = 0.3) -> dict[str, Any]:
    """One general-image, box-prompted segmentation sample, fully determined by ``seed``.

    Args:
        seed: Any non-negative integer; the same seed always gives the same sample.
        size: Image side (a multiple of 4).
        bbox_shift: Each box side is enlarged by an integer drawn uniformly from ``[0, bbox_shift]``.
        natural_fraction: Probability of a skimage photograph instead of a procedural scene.

    Returns:
        ``image`` float32 ``[3, S, S]`` in [0, 1] (min-max scaled), ``label`` float32 ``[1, S, S]`` (0/1, the
        visible part of one object), ``label_lowres`` ``[1, S/4, S/4]``, ``box`` float32 ``[4]``
        (``x0, y0, x1, y1`` pixels, covering the label) and ``name`` (``synthetic-<seed>``).
    """
    if size % _LOWRES_FACTOR:
        raise ValueError(f"size must be a multiple of {_LOWRES_FACTOR}, got {size}")
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_ATTEMPTS):
        make = natural_scene if rng.random() < natural_fraction else procedural_scene
        image, instances, candidates = make(rng, size)
        if candidates:
            break
    else:  # pragma: no cover - every scene kind yields a target within a few attempts
        raise RuntimeError(f"no selectable object after {_MAX_ATTEMPTS} scenes (seed {seed})")
    target = candidates[int(rng.integers(len(candidates)))]
    label = torch.from_numpy(instances == target).to(torch.float32)[None]
    shifts = rng.integers(0, bbox_shift, size=4, endpoint=True) if bbox_shift else np.zeros(4, dtype=np.int64)
    return {
        "image": min_max_scale(torch.from_numpy(np.ascontiguousarray(image))),
        "label": label,
        "label_lowres": _lowres(label),
        "box": box_from_mask(label, shifts),
        "name": f"synthetic-{seed}",
    }


def synthetic_batch(seeds: list[int], size: int = 256, bbox_shift: int = 0, natural_fraction: float = 0.3) -> dict:
    """Scenes of several seeds stacked into a batch (``name`` becomes a list)."""
    scenes = [synthetic_scene(s, size, bbox_shift, natural_fraction) for s in seeds]
    batch: dict[str, Any] = {
        key: torch.stack([s[key] for s in scenes]) for key in ("image", "label", "label_lowres", "box")
    }
    batch["name"] = [s["name"] for s in scenes]
    return batch
