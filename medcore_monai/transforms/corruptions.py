"""RobustMedSAM's 12 image corruptions as MONAI transforms, at five severities.

RobustMedSAM (``data/augment.py``) defines every corruption once, on uint8 RGB images in [0, 255].
Here the corruptions act on the float32 channel-first images in [0, 1] that reach the model (the
output of :func:`medcore_monai.transforms.medsam.medsam_preprocess`), so every intensity parameter
below, given on the 0–255 scale (keys ending in ``_255``), is divided by 255 before use. Outputs are
clipped to [0, 1] and stay float32 (no uint8 quantisation, except inside the JPEG round trip).

Severity 3 is RobustMedSAM's published setting; severities 1, 2, 4 and 5 scale the strength
monotonically. Where RobustMedSAM draws a parameter at random (blur kernel, contrast and brightness
factor, JPEG quality) each severity has its own range, and the ranges of neighbouring severities do
not overlap, so a stronger severity is stronger for every draw; the colour-jitter ranges are nested
(``U(1-b, 1+b)`` with a growing ``b``).

==================  =====================  ========  ========  =================  ==========  ==========
corruption          parameter              sev 1     sev 2     sev 3 (published)  sev 4       sev 5
==================  =====================  ========  ========  =================  ==========  ==========
gauss_noise         std_255                6         10        16                 24          32
gaussian_blur       kernel_sizes (OpenCV)  3         5         7, 9, 11, 13       15, 17, 19  21, 23, 25
contrast            factor_range (x-128)   1.2–1.3   1.4–1.5   1.6–1.7            1.9–2.0     2.2–2.4
brightness          factor_range           0.9–0.95  0.8–0.9   0.6–0.8            0.45–0.6    0.3–0.45
compression         quality_range (JPEG)   30–40     15–25     5–10               4           1
color_jitter        brightness             0.15      0.35      0.7                0.85        1.0
..                  contrast               0.05      0.15      0.3                0.45        0.6
..                  saturation             0.15      0.35      0.7                1.0         1.5
..                  hue                    0.05      0.2       0.7                0.7         0.7
poisson_noise       scale (counts at 1.0)  100       50        25                 12          6
speckle_noise       variance               0.04      0.1       0.25               0.5         1.0
salt_pepper_noise   amount (pixel share)   0.02      0.05      0.1                0.2         0.3
rician_noise        std_255                8         15        25                 40          60
rayleigh_noise      scale_255              15        25        40                 60          85
step_motion         shift_px               1         3         5                  7           9
==================  =====================  ========  ========  =================  ==========  ==========

Definitions (x in [0, 1], all draws from one ``numpy.random.RandomState``):

* ``gauss_noise``: ``x + N(0, std)`` per element, MONAI ``RandGaussianNoise`` with ``sample_std=False``.
* ``gaussian_blur``: kernel size drawn uniformly from the set; the kernel is OpenCV's
  ``getGaussianKernel(k, 0)`` (fixed binomial-like taps for k <= 7, else a sampled Gaussian with
  ``sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8``), applied separably with mirrored borders like
  ``cv2.GaussianBlur``'s default, through MONAI's ``separable_filtering``.
* ``contrast``: ``(x - 128/255) * f + 128/255``.
* ``brightness``: ``x * f``, MONAI ``RandScaleIntensity`` with ``factors = (lo - 1, hi - 1)``.
* ``compression``: RGB uint8 JPEG encode and decode with Pillow at the drawn quality (one channel:
  greyscale JPEG; other channel counts: each channel as its own greyscale JPEG).
* ``color_jitter``: albumentations-style ``ColorJitter``: brightness factor ``U(max(0, 1-b), 1+b)``,
  contrast factor ``U(1-c, 1+c)`` about the mean luma, saturation factor ``U(1-s, 1+s)`` towards the
  per-pixel luma, hue shift ``U(-h, h)`` of a full turn; the four steps run in a random order and each
  is clipped to [0, 1]. Saturation and hue need three (RGB) channels and are skipped otherwise.
* ``poisson_noise``: ``Poisson(x * scale) / scale``.
* ``speckle_noise``: ``x + x * N(0, sqrt(variance))`` per element.
* ``salt_pepper_noise``: ``amount`` of the pixel positions (without replacement), half set to 1 and
  half to 0, the same positions in every channel.
* ``rician_noise``: ``sqrt((x + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, std)``, MONAI ``RandRicianNoise``
  with ``relative=False, sample_std=False``.
* ``rayleigh_noise``: ``x + Rayleigh(scale) - scale * sqrt(pi / 2)`` (zero-mean noise).
* ``step_motion``: per channel, centred 2D FFT; the lower half of the rows (``rows // 2`` onwards, which
  holds the zero-frequency row) is multiplied by ``exp(-2j*pi*shift*k/cols)``, where ``k = 0 .. cols-1``
  is the column index of the fftshift-ed array; inverse FFT, magnitude. Because ``k`` is the *shifted*
  index rather than the signed frequency, for even widths the ramp carries a constant factor
  ``(-1)**shift``: odd shifts also invert half of k-space including the DC row, which dominates the
  artefact. All severities therefore use odd shifts, so that severity only
  widens the ghost offset instead of switching the inversion on and off; the consequence is that even
  severity 1 is a strong artefact, and the deviation from the clean image grows only by a few per cent
  per level.

Monotonicity: for a fixed seed every corruption except ``color_jitter`` deviates more from the clean
image at each higher severity: the parameter ranges are disjoint, and one seed draws the same
unit-scale noise at every severity (Poisson draws are not coupled this way, but their spread grows by
about sqrt(2) per level, far above the sampling error of an image). ``color_jitter`` is monotone on
average over seeds but not for every seed, because its four steps interact (e.g. a darker image shows
a smaller hue change). For ``compression``, baseline JPEG clamps quantiser steps at 255, so
qualities 1–3 are identical and severity 5 (quality 1) is the strongest JPEG setting there is.

Noise is drawn independently per channel, as RobustMedSAM does on its RGB images, so a grey image
replicated to three channels gets coloured noise; the noise-free corruptions and salt-and-pepper keep
such an image grey.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from monai.config import KeysCollection
from monai.networks.layers import separable_filtering
from monai.transforms import (
    Compose,
    MapTransform,
    RandGaussianNoise,
    Randomizable,
    RandomizableTransform,
    RandRicianNoise,
    RandScaleIntensity,
)
from monai.transforms.transform import Transform
from monai.utils import convert_to_dst_type
from PIL import Image
from skimage.color import hsv2rgb, rgb2hsv

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "Corrupt",
    "Corruptd",
    "RandCorruptiond",
    "corrupt",
    "corrupted_once",
    "corruption_seed",
    "severity_parameters",
    "with_random_corruption",
]

CORRUPTIONS = (
    "gauss_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "compression",
    "color_jitter",
    "poisson_noise",
    "speckle_noise",
    "salt_pepper_noise",
    "rician_noise",
    "rayleigh_noise",
    "step_motion",
)
SEVERITIES = (1, 2, 3, 4, 5)

ImageT = TypeVar("ImageT", np.ndarray, torch.Tensor)

_SEED_BOUND = 2**32  # numpy.random.RandomState accepts seeds in [0, 2**32)
_RANGE_SLACK = 1e-3  # tolerated excursion outside [0, 1] before an input is rejected as not normalised
_RGB = 3
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 weights, as cv2.COLOR_RGB2GRAY
# OpenCV's fixed taps for small kernels when sigma <= 0 (getGaussianKernel's small_gaussian_tab).
_CV2_SMALL_KERNELS = {
    1: (1.0,),
    3: (0.25, 0.5, 0.25),
    5: (0.0625, 0.25, 0.375, 0.25, 0.0625),
    7: (0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125),
}


def _levels(**columns: tuple[Any, ...]) -> tuple[dict[str, Any], ...]:
    """Turn per-parameter 5-tuples (one value per severity) into one dict per severity."""
    return tuple({key: values[i] for key, values in columns.items()} for i in range(len(SEVERITIES)))


# Index 2 (severity 3) is RobustMedSAM's published setting; see the module docstring.
_PARAMETERS: dict[str, tuple[dict[str, Any], ...]] = {
    "gauss_noise": _levels(std_255=(6.0, 10.0, 16.0, 24.0, 32.0)),
    "gaussian_blur": _levels(kernel_sizes=((3,), (5,), (7, 9, 11, 13), (15, 17, 19), (21, 23, 25))),
    "contrast": _levels(
        factor_range=((1.2, 1.3), (1.4, 1.5), (1.6, 1.7), (1.9, 2.0), (2.2, 2.4)),
        center_255=(128.0,) * 5,
    ),
    "brightness": _levels(factor_range=((0.9, 0.95), (0.8, 0.9), (0.6, 0.8), (0.45, 0.6), (0.3, 0.45))),
    # Baseline JPEG clamps quantiser steps at 255, so qualities 1-3 give identical files: the
    # strongest level is quality 1 and severity 4 takes the last quality above that plateau.
    "compression": _levels(quality_range=((30, 40), (15, 25), (5, 10), (4, 4), (1, 1))),
    "color_jitter": _levels(
        brightness=(0.15, 0.35, 0.7, 0.85, 1.0),
        contrast=(0.05, 0.15, 0.3, 0.45, 0.6),
        saturation=(0.15, 0.35, 0.7, 1.0, 1.5),
        # A shift of h turns is the same as 1 - h; beyond ~0.7 a wider range no longer adds effect.
        hue=(0.05, 0.2, 0.7, 0.7, 0.7),
    ),
    "poisson_noise": _levels(scale=(100.0, 50.0, 25.0, 12.0, 6.0)),
    "speckle_noise": _levels(variance=(0.04, 0.1, 0.25, 0.5, 1.0)),
    "salt_pepper_noise": _levels(amount=(0.02, 0.05, 0.1, 0.2, 0.3), salt_ratio=(0.5,) * 5),
    "rician_noise": _levels(std_255=(8.0, 15.0, 25.0, 40.0, 60.0)),
    "rayleigh_noise": _levels(scale_255=(15.0, 25.0, 40.0, 60.0, 85.0)),
    "step_motion": _levels(shift_px=(1, 3, 5, 7, 9)),
}


# --------------------------------------------------------------------------- validation and seeds


def _check_name(name: str) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"Unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")


def _check_severity(severity: Any) -> int:
    # bool is an int subclass, and True == 1 would otherwise pass as severity 1.
    if (
        isinstance(severity, (bool, np.bool_))
        or not isinstance(severity, (int, np.integer))
        or (int(severity) not in SEVERITIES)
    ):
        raise ValueError(f"Unknown severity {severity!r}; valid severities: {SEVERITIES}")
    return int(severity)


def severity_parameters(name: str, severity: int) -> dict[str, Any]:
    """Parameters of one corruption at one severity (intensities on the 0–255 scale).

    Args:
        name: One of :data:`CORRUPTIONS`.
        severity: One of :data:`SEVERITIES`; 3 is RobustMedSAM's published setting.

    Returns:
        A fresh dict (safe to modify), e.g. ``{"std_255": 16.0}`` for ``gauss_noise`` at severity 3.

    Raises:
        ValueError: For an unknown name or severity.
    """
    _check_name(name)
    return dict(_PARAMETERS[name][_check_severity(severity) - 1])


def corruption_seed(seed: int, name: str, severity: int, item_id: str) -> int:
    """Stable per-item seed: the first 4 bytes (big-endian) of SHA-256 of ``"seed:name:severity:item_id"``.

    The result depends only on its arguments (not on Python's salted ``hash``, the process, the
    dataset order or the number of workers) and fits ``numpy.random.RandomState``.

    Args:
        seed: Experiment-level seed.
        name: Corruption name (validated).
        severity: Severity (validated).
        item_id: Identifier of the item, e.g. its ``name`` field.

    Returns:
        An integer in ``[0, 2**32)``.
    """
    _check_name(name)
    severity = _check_severity(severity)
    digest = hashlib.sha256(f"{int(seed)}:{name}:{severity}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# --------------------------------------------------------------------------- type handling


def _to_numpy(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 numpy view/copy of a channel-first image, checked for shape, dtype and range."""
    if isinstance(image, torch.Tensor):
        plain = image.as_tensor() if hasattr(image, "as_tensor") else image
        if not plain.is_floating_point():
            raise ValueError(f"Corruptions expect a float image in [0, 1], got dtype {plain.dtype}")
        array = plain.detach().to("cpu", torch.float32).numpy()
    else:
        array = np.asarray(image)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"Corruptions expect a float image in [0, 1], got dtype {array.dtype}")
        array = array.astype(np.float32, copy=False)
    if array.ndim != 3:
        raise ValueError(f"Corruptions expect a channel-first image [C, H, W], got shape {tuple(array.shape)}")
    if array.size and (float(array.min()) < -_RANGE_SLACK or float(array.max()) > 1 + _RANGE_SLACK):
        raise ValueError(
            f"Corruptions expect intensities in [0, 1] (got [{float(array.min()):.3g}, {float(array.max()):.3g}]); "
            "scale the image first, e.g. with MinMaxScaled"
        )
    return array


def _like(result: np.ndarray, template: ImageT) -> ImageT:
    """``result`` as the type and device of ``template``, float32; a MetaTensor keeps its metadata."""
    if isinstance(template, torch.Tensor):
        return convert_to_dst_type(torch.from_numpy(result), template, dtype=torch.float32)[0]
    return result


def _run_monai(transform: Transform, image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Apply a MONAI random array transform with our generator, on a plain tensor, back to numpy."""
    transform.set_random_state(state=rng)
    out = transform(torch.from_numpy(image))
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    return out.numpy()


def _luma(image: np.ndarray) -> np.ndarray:
    """Per-pixel luma ``[1, H, W]`` of an RGB image; a non-RGB image is its own channel mean."""
    if image.shape[0] == _RGB:
        return np.tensordot(_LUMA, image, axes=1)[None]
    return image.mean(axis=0, keepdims=True)


# --------------------------------------------------------------------------- the 12 corruptions


def _gauss_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    noise = RandGaussianNoise(prob=1.0, mean=0.0, std=p["std_255"] / 255.0, sample_std=False)
    return _run_monai(noise, image, rng)


def _cv2_gaussian_kernel(size: int) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel(size, 0)``: the kernel ``cv2.GaussianBlur(img, (size, size), 0)`` uses."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be odd and positive, got {size}")
    if size in _CV2_SMALL_KERNELS:
        return torch.tensor(_CV2_SMALL_KERNELS[size], dtype=torch.float32)
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (taps / taps.sum()).to(torch.float32)


def _gaussian_blur(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    size = int(rng.choice(p["kernel_sizes"]))
    kernel = _cv2_gaussian_kernel(size)
    radius = size // 2
    # cv2's default border is BORDER_REFLECT_101 (torch "reflect"); MONAI's GaussianSmooth pads with
    # zeros, which darkens the image border. Reflection needs the pad to be smaller than the image.
    mode = "reflect" if radius < min(image.shape[1:]) else "replicate"
    blurred = separable_filtering(torch.from_numpy(image)[None], [kernel, kernel], mode=mode)
    return blurred[0].numpy()


def _contrast(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    factor = rng.uniform(*p["factor_range"])
    center = p["center_255"] / 255.0
    return (image - center) * factor + center


def _brightness(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    low, high = p["factor_range"]
    # MONAI scales by (1 + factor), so the factor range shifts by one.
    scale = RandScaleIntensity(factors=(low - 1.0, high - 1.0), prob=1.0)
    return _run_monai(scale, image, rng)


def _jpeg_round_trip(plane: np.ndarray, mode: str, quality: int) -> np.ndarray:
    """Encode a uint8 ``[H, W]`` or ``[H, W, 3]`` array as JPEG and decode it."""
    buffer = io.BytesIO()
    Image.fromarray(plane, mode=mode).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert(mode))


def _compression(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    low, high = p["quality_range"]
    quality = int(rng.randint(low, high + 1))  # inclusive, as Python's random.randint in RobustMedSAM
    as_uint8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if image.shape[0] == _RGB:
        decoded = np.moveaxis(_jpeg_round_trip(np.moveaxis(as_uint8, 0, -1), "RGB", quality), -1, 0)
    else:
        decoded = np.stack([_jpeg_round_trip(channel, "L", quality) for channel in as_uint8])
    return decoded.astype(np.float32) / 255.0


def _jitter_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    return image * factor


def _jitter_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    mean = float(_luma(image).mean())
    return (image - mean) * factor + mean


def _jitter_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    if image.shape[0] != _RGB:
        return image
    grey = _luma(image)
    return grey + (image - grey) * factor


def _jitter_hue(image: np.ndarray, shift: float) -> np.ndarray:
    if image.shape[0] != _RGB:
        return image
    hsv = rgb2hsv(image, channel_axis=0)
    hsv[0] = np.mod(hsv[0] + shift, 1.0)
    return hsv2rgb(hsv, channel_axis=0).astype(np.float32)


def _color_jitter(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    # Order and unit draws come first and do not depend on the severity, so one seed gives the same
    # order and the same relative position in each severity's range.
    order = rng.permutation(4)
    unit = rng.uniform(size=4)
    b, c, s, h = p["brightness"], p["contrast"], p["saturation"], p["hue"]
    steps: tuple[tuple[Callable[[np.ndarray, float], np.ndarray], float], ...] = (
        (_jitter_brightness, max(0.0, 1 - b) + unit[0] * (1 + b - max(0.0, 1 - b))),
        (_jitter_contrast, max(0.0, 1 - c) + unit[1] * (1 + c - max(0.0, 1 - c))),
        (_jitter_saturation, max(0.0, 1 - s) + unit[2] * (1 + s - max(0.0, 1 - s))),
        (_jitter_hue, -h + unit[3] * 2 * h),
    )
    out = image
    for index in order:
        step, value = steps[index]
        # albumentations works on uint8 images, so each step saturates before the next one.
        out = np.clip(step(out, float(value)), 0.0, 1.0).astype(np.float32)
    return out


def _poisson_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    scale = float(p["scale"])
    return rng.poisson(image.astype(np.float64) * scale) / scale


def _speckle_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    return image + image * rng.normal(0.0, math.sqrt(p["variance"]), size=image.shape)


def _salt_pepper_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    channels, height, width = image.shape
    positions = height * width
    hits = rng.permutation(positions)[: int(round(p["amount"] * positions))]
    n_salt = int(round(len(hits) * p["salt_ratio"]))
    out = image.reshape(channels, positions).copy()
    out[:, hits[:n_salt]] = 1.0
    out[:, hits[n_salt:]] = 0.0
    return out.reshape(image.shape)


def _rician_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    noise = RandRicianNoise(prob=1.0, mean=0.0, std=p["std_255"] / 255.0, relative=False, sample_std=False)
    return _run_monai(noise, image, rng)


def _rayleigh_noise(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    scale = p["scale_255"] / 255.0
    return image + rng.rayleigh(scale, size=image.shape) - scale * math.sqrt(math.pi / 2.0)


def _step_motion(image: np.ndarray, p: Mapping[str, Any], rng: np.random.RandomState) -> np.ndarray:
    del rng  # deterministic
    rows, cols = image.shape[1:]
    ramp = np.exp(-2j * np.pi * p["shift_px"] * np.arange(cols) / cols)
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))
    spectrum[:, rows // 2 :, :] *= ramp
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1)), axes=(-2, -1)))


_FUNCTIONS: dict[str, Callable[[np.ndarray, Mapping[str, Any], np.random.RandomState], np.ndarray]] = {
    "gauss_noise": _gauss_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "compression": _compression,
    "color_jitter": _color_jitter,
    "poisson_noise": _poisson_noise,
    "speckle_noise": _speckle_noise,
    "salt_pepper_noise": _salt_pepper_noise,
    "rician_noise": _rician_noise,
    "rayleigh_noise": _rayleigh_noise,
    "step_motion": _step_motion,
}


# --------------------------------------------------------------------------- public API


def corrupt(
    image: ImageT,
    name: str,
    severity: int = 3,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
) -> ImageT:
    """Apply one corruption to a channel-first float image in [0, 1].

    Args:
        image: ``[C, H, W]`` numpy array, tensor or MetaTensor with values in [0, 1].
        name: One of :data:`CORRUPTIONS`.
        severity: One of :data:`SEVERITIES`.
        seed: Seed of the ``numpy.random.RandomState`` that draws every random quantity. The same
            seed at different severities draws the same unit-scale randomness, so the severities of
            one seed differ only in strength.
        overrides: Replace some of :func:`severity_parameters`' values (same keys), e.g.
            ``{"shift_px": 0}``.

    Returns:
        The corrupted image, float32, clipped to [0, 1], of the input's type and device; a
        MetaTensor keeps its metadata.

    Raises:
        ValueError: For an unknown name, severity or override key, or an input that is not a float
            ``[C, H, W]`` image in [0, 1].
    """
    params = severity_parameters(name, severity)
    unknown = set(overrides or {}) - set(params)
    if unknown:
        raise ValueError(f"Unknown parameters {sorted(unknown)} for {name!r}; valid: {sorted(params)}")
    params.update(overrides or {})
    array = _to_numpy(image)
    result = _FUNCTIONS[name](array, params, np.random.RandomState(int(seed) % _SEED_BOUND))
    return _like(np.clip(result, 0.0, 1.0).astype(np.float32), image)


class Corrupt(RandomizableTransform):
    """One RobustMedSAM corruption at one severity, as a MONAI array transform.

    Each call draws a fresh seed from ``self.R`` and passes it to :func:`corrupt`, so a transform
    seeded with ``set_random_state(seed)`` gives the same sequence of outputs every time.
    """

    def __init__(self, name: str, severity: int = 3, prob: float = 1.0) -> None:
        """Create the transform.

        Args:
            name: One of :data:`CORRUPTIONS`.
            severity: One of :data:`SEVERITIES`.
            prob: Probability of corrupting an image (RobustMedSAM always corrupts: 1).

        Raises:
            ValueError: For an unknown name or severity.
        """
        RandomizableTransform.__init__(self, prob)
        _check_name(name)
        self.name, self.severity = name, _check_severity(severity)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Decide whether to corrupt and draw the seed of the next corruption."""
        super().randomize(None)
        self._seed = int(self.R.randint(_SEED_BOUND, dtype="uint32"))

    def __call__(self, img: ImageT, randomize: bool = True) -> ImageT:
        """Corrupt ``img`` (``[C, H, W]`` in [0, 1]); returns the same type, float32."""
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return corrupt(img, self.name, self.severity, self._seed)


class Corruptd(Randomizable, MapTransform):
    """Dictionary version of :class:`Corrupt`; every key of an item gets the same corruption.

    With ``per_item_seed=True`` (evaluation) the randomness of an item comes from
    :func:`corruption_seed` of ``seed``, the corruption, the severity and the item's id (its
    ``name_key`` field, else a SHA-256 of the first key's image), so it does not depend on dataset
    order, workers or caching; ``set_random_state`` (which ``Compose`` calls) does not change it.
    With ``per_item_seed=False`` seeds come from ``self.R`` in call order, like any MONAI random
    transform.
    """

    def __init__(
        self,
        keys: KeysCollection,
        name: str,
        severity: int = 3,
        seed: int = 0,
        per_item_seed: bool = True,
        name_key: str = "name",
        allow_missing_keys: bool = False,
    ) -> None:
        """Create the transform.

        Args:
            keys: Keys of the images to corrupt.
            name: One of :data:`CORRUPTIONS`.
            severity: One of :data:`SEVERITIES`.
            seed: Base seed (per-item mode) or the seed of ``self.R`` (sequence mode).
            per_item_seed: Derive each item's seed from its id instead of from call order.
            name_key: Key of the item id used in per-item mode.
            allow_missing_keys: Skip absent keys instead of raising ``KeyError``.

        Raises:
            ValueError: For an unknown name or severity.
        """
        MapTransform.__init__(self, keys, allow_missing_keys)
        _check_name(name)
        self.name, self.severity = name, _check_severity(severity)
        self.seed, self.per_item_seed, self.name_key = int(seed), per_item_seed, name_key
        self._seed = 0
        self.set_random_state(seed)

    def randomize(self, data: Any = None) -> None:
        """Draw the seed of the next item (sequence mode only)."""
        self._seed = int(self.R.randint(_SEED_BOUND, dtype="uint32"))

    def item_seed(self, data: Mapping[Hashable, Any]) -> int:
        """Per-item seed of ``data`` (see the class docstring)."""
        return corruption_seed(self.seed, self.name, self.severity, self._item_id(data))

    def _item_id(self, data: Mapping[Hashable, Any]) -> str:
        if data.get(self.name_key) is not None:
            return str(data[self.name_key])
        keys = list(self.key_iterator(data))
        if not keys:
            raise KeyError(f"Per-item corruption seed needs {self.name_key!r} or one of the keys {self.keys}")
        array = np.ascontiguousarray(_to_numpy(data[keys[0]]))
        digest = hashlib.sha256(f"{array.shape}".encode() + array.tobytes()).hexdigest()
        return f"sha256:{digest[:32]}"

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Corrupt every key of one item."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        if self.per_item_seed:
            seed = self.item_seed(d)
        else:
            self.randomize()
            seed = self._seed
        for key in keys:
            d[key] = corrupt(d[key], self.name, self.severity, seed)
        return d


class RandCorruptiond(Randomizable, MapTransform):
    """Corrupt each item with one corruption and severity drawn at random, or leave it clean.

    RobustMedSAM trains its decoder on pairs whose degraded view is drawn uniformly from the clean image
    and its 12 corruptions; this is that draw (over ``names x severities``, plus clean when
    ``include_clean``) as a training transform. Seed it with ``set_random_state``.

    Args:
        keys: Image keys (every key of an item gets the same corruption).
        names: Corruptions to draw from (default: all 12).
        severities: Severities to draw from.
        include_clean: Also draw "no corruption", with the same probability as each corruption.
        clean_key: Also keep the uncorrupted first image key under this key (clean/degraded pairs for
            RobustSAM's consistency loss).
        allow_missing_keys: Skip missing keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection,
        names: tuple[str, ...] | list[str] = CORRUPTIONS,
        severities: tuple[int, ...] | list[int] = (3,),
        include_clean: bool = True,
        clean_key: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.clean_key = clean_key
        for name in names:
            _check_name(name)
        for severity in severities:
            _check_severity(severity)
        if not names or not severities:
            raise ValueError("RandCorruptiond needs at least one corruption name and one severity")
        self.choices: list[tuple[str, int] | None] = [(n, int(s)) for n in names for s in severities]
        if include_clean:
            # clean is as likely as any one corruption (over its severities), as in RobustMedSAM's pairing
            self.choices += [None] * len(severities)
        self._choice: tuple[str, int] | None = None
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the corruption (or clean) and its noise seed for the next item."""
        self._choice = self.choices[int(self.R.randint(len(self.choices)))]
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with its image keys corrupted (or unchanged when clean is drawn)."""
        self.randomize()
        out = dict(data)
        out["corruption"] = "clean" if self._choice is None else f"{self._choice[0]}@{self._choice[1]}"
        if self.clean_key is not None:
            out[self.clean_key] = out[self.first_key(out)]
        if self._choice is None:
            return out
        for key in self.key_iterator(out):
            out[key] = corrupt(out[key], self._choice[0], self._choice[1], seed=self._seed)
        return out


def with_random_corruption(
    transform: Compose,
    names: Sequence[str],
    severities: Sequence[int],
    seed: int,
    clean_key: str | None = None,
) -> Compose:
    """``transform`` followed by :class:`RandCorruptiond` on ``image``, flat so its deterministic part stays cacheable.

    Every random step (the transform's own and the corruption) is seeded from ``seed``.
    """
    corruption = RandCorruptiond(keys="image", names=names, severities=severities, clean_key=clean_key)
    steps = [*transform.transforms, corruption]
    pipeline = Compose(steps)
    # Compose re-seeds its members from MONAI's global seed; seed the random ones from ours afterwards
    for offset, step in enumerate(t for t in steps if isinstance(t, Randomizable)):
        step.set_random_state(seed=seed + offset)
    return pipeline


def corrupted_once(
    samples: Sequence[Mapping[Hashable, Any]],
    names: Sequence[str],
    severities: Sequence[int],
    seed: int,
    clean_key: str | None = None,
) -> list[dict[Hashable, Any]]:
    """``samples`` degraded by one seeded :class:`RandCorruptiond` draw each (e.g. a fixed validation set)."""
    draw = RandCorruptiond(keys="image", names=names, severities=severities, clean_key=clean_key)
    draw.set_random_state(seed=seed)
    return [draw(samples[i]) for i in range(len(samples))]
