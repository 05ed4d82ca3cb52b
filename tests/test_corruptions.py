"""Tests for the RobustMedSAM corruption transforms and the corruption grid figure."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from PIL import Image

from medcore_monai.reports.corruptions import plot_corruption_grid
from medcore_monai.transforms import (
    CORRUPTIONS,
    SEVERITIES,
    Corrupt,
    Corruptd,
    corrupt,
    corruption_seed,
    severity_parameters,
)

SIZE = 64
NOISE = ("gauss_noise", "poisson_noise", "speckle_noise", "salt_pepper_noise", "rician_noise", "rayleigh_noise")
NOISE_FREE = ("gaussian_blur", "contrast", "brightness", "compression", "color_jitter", "step_motion")
# Random only through a continuous parameter draw, so two seeds practically never coincide.
CONTINUOUS_DRAW = ("contrast", "brightness", "color_jitter")


def colour_image(size: int = SIZE) -> np.ndarray:
    """Smooth RGB test image with texture, values well inside (0, 1)."""
    yy, xx = np.mgrid[:size, :size] / size
    rng = np.random.default_rng(123)
    image = np.stack(
        [
            0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy),
            0.4 + 0.3 * np.cos(5 * xx + yy),
            0.5 + 0.25 * np.sin(3 * yy + 2 * xx),
        ]
    ) + 0.03 * rng.standard_normal((3, size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def grey_image(size: int = SIZE) -> np.ndarray:
    return np.repeat(colour_image(size)[:1], 3, axis=0)


def constant(value: float, size: int = SIZE) -> np.ndarray:
    return np.full((3, size, size), value, dtype=np.float32)


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


# --------------------------------------------------------------------------- names, parameters, validation


def test_names_and_severities():
    assert CORRUPTIONS == (
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
    assert SEVERITIES == (1, 2, 3, 4, 5)


def test_severity_3_is_robustmedsam_published_setting():
    published = {
        "gauss_noise": {"std_255": 16},
        "gaussian_blur": {"kernel_sizes": (7, 9, 11, 13)},
        "contrast": {"factor_range": (1.6, 1.7), "center_255": 128},
        "brightness": {"factor_range": (0.6, 0.8)},
        "compression": {"quality_range": (5, 10)},
        "color_jitter": {"brightness": 0.7, "contrast": 0.3, "saturation": 0.7, "hue": 0.7},
        "poisson_noise": {"scale": 25},
        "speckle_noise": {"variance": 0.25},
        "salt_pepper_noise": {"amount": 0.1, "salt_ratio": 0.5},
        "rician_noise": {"std_255": 25},
        "rayleigh_noise": {"scale_255": 40},
        "step_motion": {"shift_px": 5},
    }
    for name in CORRUPTIONS:
        assert severity_parameters(name, 3) == published[name], name


def test_severity_parameters_returns_a_copy():
    params = severity_parameters("gauss_noise", 3)
    params["std_255"] = 99
    assert severity_parameters("gauss_noise", 3)["std_255"] == 16


@pytest.mark.parametrize("bad", ["gaussian_noise", "", "GAUSS_NOISE"])
def test_unknown_name_lists_valid_names(bad):
    for call in (
        lambda: severity_parameters(bad, 3),
        lambda: corrupt(constant(0.5), bad, 3),
        lambda: Corrupt(bad, 3),
        lambda: Corruptd("image", bad, 3),
        lambda: corruption_seed(0, bad, 3, "x"),
    ):
        with pytest.raises(ValueError, match="step_motion"):
            call()


@pytest.mark.parametrize("bad", [0, 6, -1, 3.0, "3", True, None])
def test_unknown_severity_lists_valid_severities(bad):
    for call in (
        lambda: severity_parameters("contrast", bad),
        lambda: corrupt(constant(0.5), "contrast", bad),
        lambda: Corrupt("contrast", bad),
        lambda: Corruptd("image", "contrast", bad),
        lambda: corruption_seed(0, "contrast", bad, "x"),
    ):
        with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 5\)"):
            call()


def test_numpy_integer_severity_is_accepted():
    assert severity_parameters("contrast", np.int64(2)) == severity_parameters("contrast", 2)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((3, 8, 8), dtype=np.uint8), "float"),
        (np.full((3, 8, 8), 200.0, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((8, 8), dtype=np.float32), "channel-first"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), "float"),
    ],
)
def test_invalid_images_raise(image, message):
    with pytest.raises(ValueError, match=message):
        corrupt(image, "contrast", 3)


def test_unknown_override_raises():
    with pytest.raises(ValueError, match="shift_px"):
        corrupt(constant(0.5), "step_motion", 3, overrides={"shift": 0})


# --------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_type_and_range(name, severity):
    image = colour_image(32)
    out = corrupt(image, name, severity, seed=1)
    assert isinstance(out, np.ndarray)
    assert out.shape == image.shape and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert np.all(np.isfinite(out))
    assert not np.array_equal(out, image), "every corruption must change the image"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_torch_and_metatensor_types_are_kept(name):
    image = colour_image(32)
    plain = corrupt(torch.from_numpy(image.astype(np.float64)), name, 3, seed=2)
    assert type(plain) is torch.Tensor and plain.dtype == torch.float32
    meta = MetaTensor(torch.from_numpy(image), meta={"filename_or_obj": "case_7.png", "tag": [1, 2]})
    out = corrupt(meta, name, 3, seed=2)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "case_7.png" and out.meta["tag"] == [1, 2]
    assert torch.equal(out.as_tensor(), plain)
    assert np.array_equal(out.numpy(), corrupt(image, name, 3, seed=2))


def test_float64_numpy_becomes_float32_and_input_is_untouched():
    image = colour_image(32).astype(np.float64)
    before = image.copy()
    out = corrupt(image, "salt_pepper_noise", 3, seed=0)
    assert out.dtype == np.float32
    assert np.array_equal(image, before)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_seed_same_output(name):
    image = colour_image(32)
    assert np.array_equal(corrupt(image, name, 3, seed=5), corrupt(image, name, 3, seed=5))


@pytest.mark.parametrize("name", NOISE + CONTINUOUS_DRAW)
def test_different_seed_different_output(name):
    image = colour_image(32)
    assert not np.array_equal(corrupt(image, name, 3, seed=5), corrupt(image, name, 3, seed=6))


def test_deterministic_corruptions_ignore_the_seed():
    image = colour_image(32)
    for seed in (1, 2, 3):
        assert np.array_equal(corrupt(image, "step_motion", 3, seed=0), corrupt(image, "step_motion", 3, seed=seed))
        # severities 1 and 2 have a single blur kernel
        assert np.array_equal(corrupt(image, "gaussian_blur", 1, seed=0), corrupt(image, "gaussian_blur", 1, seed=seed))


def test_blur_and_jpeg_draw_their_parameter_from_the_published_set():
    image = colour_image(32)
    by_kernel = {k: corrupt(image, "gaussian_blur", 3, overrides={"kernel_sizes": (k,)}) for k in (7, 9, 11, 13)}
    by_quality = {q: corrupt(image, "compression", 3, overrides={"quality_range": (q, q)}) for q in range(5, 11)}
    seen_kernels, seen_qualities = set(), set()
    for seed in range(12):
        blurred = corrupt(image, "gaussian_blur", 3, seed=seed)
        seen_kernels |= {k for k, ref in by_kernel.items() if np.array_equal(blurred, ref)}
        jpeg = corrupt(image, "compression", 3, seed=seed)
        seen_qualities |= {q for q, ref in by_quality.items() if np.array_equal(jpeg, ref)}
    assert len(seen_kernels) >= 3 and seen_kernels <= {7, 9, 11, 13}
    assert len(seen_qualities) >= 3 and seen_qualities <= set(range(5, 11))


# --------------------------------------------------------------------------- severity


def test_severity_is_monotone_on_average():
    image = colour_image()
    for name in CORRUPTIONS:
        curve = [np.mean([mad(corrupt(image, name, s, seed=seed), image) for seed in range(4)]) for s in SEVERITIES]
        assert all(b > a for a, b in zip(curve, curve[1:])), (name, curve)


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n != "color_jitter"])
def test_severity_is_monotone_for_each_seed(name):
    # colour jitter is excluded: its steps interact, so it is monotone only on average (see module docstring)
    image = colour_image()
    for seed in range(3):
        curve = [mad(corrupt(image, name, s, seed=seed), image) for s in SEVERITIES]
        assert all(b > a for a, b in zip(curve, curve[1:])), (name, seed, curve)


# --------------------------------------------------------------------------- grey images


@pytest.mark.parametrize("name", NOISE_FREE + ("salt_pepper_noise",))
def test_grey_images_stay_grey(name):
    grey = grey_image(32)
    for severity in (1, 3, 5):
        out = corrupt(grey, name, severity, seed=3)
        assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2]), (name, severity)


@pytest.mark.parametrize("name", [n for n in NOISE if n != "salt_pepper_noise"])
def test_pixel_noise_is_drawn_per_channel(name):
    # as in RobustMedSAM, where noise of the image's full HWC shape is added to RGB images
    out = corrupt(grey_image(32), name, 3, seed=3)
    assert not np.array_equal(out[0], out[1])


# --------------------------------------------------------------------------- definitions, checked numerically


def test_brightness_scales_by_a_factor_in_published_range():
    image = colour_image()
    factors = []
    for seed in range(5):
        ratio = corrupt(image, "brightness", 3, seed=seed)[image > 0.05] / image[image > 0.05]
        assert np.allclose(ratio, ratio.mean(), atol=1e-5)
        factors.append(float(ratio.mean()))
    assert all(0.6 <= f <= 0.8 for f in factors)
    assert len({round(f, 6) for f in factors}) == 5


def test_contrast_stretches_about_128_then_clips():
    center = 128 / 255
    values = np.linspace(0.0, 1.0, SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE)
    image = np.repeat(values, 3, axis=0)
    out = corrupt(image, "contrast", 3, seed=4)
    inside = (np.abs(image - center) > 0.05) & (out > 0) & (out < 1)
    factor = (out[inside] - center) / (image[inside] - center)
    assert np.allclose(factor, factor.mean(), atol=1e-4)
    assert 1.6 <= factor.mean() <= 1.7
    assert np.all(out[image < center - 0.31] == 0.0) and np.all(out[image > center + 0.31] == 1.0)


def test_salt_and_pepper_hits_ten_percent_of_positions_in_all_channels():
    image = constant(0.5)
    out = corrupt(image, "salt_pepper_noise", 3, seed=7)
    changed = out != 0.5
    assert np.array_equal(changed[0], changed[1]) and np.array_equal(changed[1], changed[2])
    assert changed[0].sum() == round(0.1 * SIZE * SIZE)
    salt, pepper = int((out[0] == 1).sum()), int((out[0] == 0).sum())
    assert abs(salt - pepper) <= 1 and salt + pepper == changed[0].sum()


def test_rician_noise_statistics():
    sigma = 25 / 255
    zero = corrupt(np.zeros((3, 128, 128), dtype=np.float32), "rician_noise", 3, seed=8)
    # on a zero image the output is Rayleigh(sigma), mean sigma * sqrt(pi/2)
    assert zero.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.02)
    # E[(x + n1)^2 + n2^2] = x^2 + 2 sigma^2 (no clipping at x = 0.5)
    half = corrupt(constant(0.5, 128), "rician_noise", 3, seed=8)
    assert float((half.astype(np.float64) ** 2).mean()) == pytest.approx(0.25 + 2 * sigma**2, rel=0.01)


def test_gauss_noise_std():
    out = corrupt(constant(0.5, 128), "gauss_noise", 3, seed=9)
    assert float(out.std()) == pytest.approx(16 / 255, rel=0.03)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.002)


def test_poisson_noise_statistics():
    out = corrupt(constant(0.4, 128), "poisson_noise", 3, seed=10)
    assert np.allclose(out * 25, np.round(out * 25), atol=1e-4), "counts divided by the scale 25"
    assert float(out.mean()) == pytest.approx(0.4, abs=0.005)
    assert float(out.var()) == pytest.approx(0.4 / 25, rel=0.05)


def test_speckle_noise_is_multiplicative_with_std_half():
    out = corrupt(constant(0.2, 128), "speckle_noise", 3, seed=11)
    relative = out / 0.2 - 1  # N(0, 0.5), clipped only below -1 and above 4
    q25, q50, q75 = np.percentile(relative, [25, 50, 75])
    assert q50 == pytest.approx(0.0, abs=0.02)
    assert q75 - q25 == pytest.approx(1.349 * 0.5, rel=0.04)


def test_rayleigh_noise_is_zero_mean():
    scale = 40 / 255
    out = corrupt(constant(0.5, 128), "rayleigh_noise", 3, seed=12)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.003)
    assert float(out.std()) == pytest.approx(scale * math.sqrt((4 - math.pi) / 2), rel=0.03)
    # the Rayleigh draw is non-negative, so nothing falls below 0.5 - scale * sqrt(pi / 2)
    assert float(out.min()) >= 0.5 - scale * math.sqrt(math.pi / 2) - 1e-6


def test_step_motion_with_zero_shift_is_identity():
    image = colour_image()
    assert np.allclose(corrupt(image, "step_motion", 3, overrides={"shift_px": 0}), image, atol=1e-5)


def test_step_motion_matches_a_per_channel_kspace_reference():
    image = colour_image()
    out = corrupt(image, "step_motion", 3)
    expected = np.empty_like(image)
    for c, plane in enumerate(image.astype(np.float64)):
        k = np.fft.fftshift(np.fft.fft2(plane))
        rows, cols = k.shape
        for row in range(rows // 2, rows):
            for col in range(cols):
                k[row, col] *= np.exp(-2j * np.pi * 5 * col / cols)
        expected[c] = np.abs(np.fft.ifft2(np.fft.ifftshift(k)))
    assert np.allclose(out, np.clip(expected, 0, 1), atol=1e-5)


def _lower_half_kspace(image: np.ndarray, factor) -> np.ndarray:
    """Every channel with the lower half of its fftshift-ed k-space rows multiplied by ``factor``."""
    out = np.empty_like(image)
    for c, plane in enumerate(image.astype(np.float64)):
        k = np.fft.fftshift(np.fft.fft2(plane))
        k[k.shape[0] // 2 :] *= factor
        out[c] = np.clip(np.abs(np.fft.ifft2(np.fft.ifftshift(k))), 0, 1)
    return out


@pytest.mark.parametrize("severity", SEVERITIES)
def test_step_motion_is_a_shift_plus_a_half_kspace_inversion_at_every_severity(severity):
    # docs/robustness.md relies on this: on even widths the reference ramp (shifted column index) is
    # (-1)**shift times a true shift ramp (signed frequency), and every severity's shift is odd, so every
    # severity also negates the lower half of k-space; that inversion, not the shift, is what moves Dice
    image = colour_image()
    shift = severity_parameters("step_motion", severity)["shift_px"]
    cols = image.shape[-1]
    assert cols % 2 == 0 and shift % 2 == 1
    signed = np.arange(cols) - cols // 2
    expected = _lower_half_kspace(image, -np.exp(-2j * np.pi * shift * signed / cols))
    assert np.allclose(corrupt(image, "step_motion", severity), expected, atol=1e-5)


def test_step_motion_looks_more_like_the_inversion_than_like_the_image():
    image = colour_image()
    flipped = _lower_half_kspace(image, -1.0)
    for severity in (1, 3):
        out = corrupt(image, "step_motion", severity)
        assert np.corrcoef(out.ravel(), flipped.ravel())[0, 1] > np.corrcoef(out.ravel(), image.ravel())[0, 1]


def test_gaussian_blur_uses_opencv_kernel_and_mirrored_border():
    impulse = np.zeros((3, 15, 15), dtype=np.float32)
    impulse[:, 7, 7] = 1.0
    out = corrupt(impulse, "gaussian_blur", 1)  # kernel size 3: OpenCV taps [1/4, 1/2, 1/4]
    taps = np.array([0.25, 0.5, 0.25])
    expected = np.zeros((15, 15))
    expected[6:9, 6:9] = np.outer(taps, taps)
    assert np.allclose(out[0], expected, atol=1e-6)
    # a constant image stays constant up to its border (zero padding would darken the edges)
    flat = corrupt(constant(0.6, 32), "gaussian_blur", 5, seed=0)
    assert np.allclose(flat, 0.6, atol=1e-5)


def test_compression_is_a_pillow_jpeg_round_trip():
    image = colour_image()
    out = corrupt(image, "compression", 3, overrides={"quality_range": (7, 7)})
    buffer = io.BytesIO()
    rgb = np.clip(np.rint(np.moveaxis(image, 0, -1) * 255), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=7)
    expected = np.moveaxis(np.asarray(Image.open(buffer).convert("RGB")), -1, 0) / 255.0
    assert np.allclose(out, expected, atol=1e-6)


def test_color_jitter_changes_hue_of_colour_images():
    image = colour_image()
    out = corrupt(image, "color_jitter", 3, seed=0, overrides={"brightness": 0, "contrast": 0, "saturation": 0})
    # brightness, contrast and saturation factors are exactly 1, so only the hue moves: value (max) is kept
    assert np.allclose(out.max(axis=0), image.max(axis=0), atol=1e-5)
    assert mad(out, image) > 0.01


# --------------------------------------------------------------------------- seeds and transforms


def test_corruption_seed_is_a_stable_sha256():
    expected = int.from_bytes(hashlib.sha256(b"3:rician_noise:2:case_01").digest()[:4], "big")
    assert corruption_seed(3, "rician_noise", 2, "case_01") == expected
    seeds = {
        corruption_seed(3, "rician_noise", 2, "case_01"),
        corruption_seed(4, "rician_noise", 2, "case_01"),
        corruption_seed(3, "gauss_noise", 2, "case_01"),
        corruption_seed(3, "rician_noise", 1, "case_01"),
        corruption_seed(3, "rician_noise", 2, "case_02"),
    }
    assert len(seeds) == 5 and all(0 <= s < 2**32 for s in seeds)


def test_corrupt_transform_is_reproducible_given_the_random_state():
    image = colour_image(32)
    first = Corrupt("gauss_noise", 3).set_random_state(seed=17)
    second = Corrupt("gauss_noise", 3).set_random_state(seed=17)
    outputs = [first(image) for _ in range(3)]
    assert all(np.array_equal(a, second(image)) for a in outputs)
    assert not np.array_equal(outputs[0], outputs[1]), "each call draws fresh noise"
    other = Corrupt("gauss_noise", 3).set_random_state(seed=18)
    assert not np.array_equal(outputs[0], other(image))


def test_corrupt_transform_with_prob_zero_returns_the_input():
    image = colour_image(32)
    assert Corrupt("contrast", 3, prob=0.0).set_random_state(seed=0)(image) is image


def items(n: int = 4) -> list[dict]:
    base = colour_image(32)
    return [{"image": np.roll(base, 3 * i, axis=-1), "name": f"case_{i}"} for i in range(n)]


def test_corruptd_per_item_seed_does_not_depend_on_order():
    forward = Corruptd("image", "speckle_noise", 3, seed=1)
    backward = Corruptd("image", "speckle_noise", 3, seed=1)
    ahead = {d["name"]: forward(d)["image"] for d in items()}
    behind = {d["name"]: backward(d)["image"] for d in reversed(items())}
    assert all(np.array_equal(ahead[name], behind[name]) for name in ahead)
    item = items()[2]
    expected = corrupt(item["image"], "speckle_noise", 3, corruption_seed(1, "speckle_noise", 3, "case_2"))
    assert np.array_equal(ahead["case_2"], expected)


def test_corruptd_per_item_seed_survives_compose_reseeding():
    plain = Corruptd("image", "gauss_noise", 3, seed=1)
    composed = Compose([Corruptd("image", "gauss_noise", 3, seed=1)]).set_random_state(seed=99)
    item = items()[1]
    assert np.array_equal(plain(item)["image"], composed(item)["image"])


def test_corruptd_without_name_hashes_the_image():
    transform = Corruptd("image", "rayleigh_noise", 3, seed=0)
    images = [d["image"] for d in items(3)]
    ahead = [transform({"image": im})["image"] for im in images]
    behind = [transform({"image": im})["image"] for im in reversed(images)]
    assert all(np.array_equal(a, b) for a, b in zip(ahead, reversed(behind)))
    # the same content under two names gets different noise; the same content without a name the same noise
    named = transform({"image": images[0], "name": "a"})["image"]
    assert not np.array_equal(named, ahead[0])
    assert np.array_equal(transform({"image": images[0].copy()})["image"], ahead[0])


def test_corruptd_sequence_mode_is_seeded_but_order_dependent():
    first = Corruptd("image", "gauss_noise", 3, seed=5, per_item_seed=False)
    second = Corruptd("image", "gauss_noise", 3, seed=5, per_item_seed=False)
    data = items(2)
    a = [first(d)["image"] for d in data]
    b = [second(d)["image"] for d in data]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    third = Corruptd("image", "gauss_noise", 3, seed=5, per_item_seed=False)
    assert not np.array_equal(third(data[1])["image"], a[1])


def test_corruptd_applies_the_same_corruption_to_every_key_and_keeps_meta():
    image = MetaTensor(torch.from_numpy(colour_image(32)), meta={"filename_or_obj": "x.png"})
    out = Corruptd(("image", "copy"), "salt_pepper_noise", 3)({"image": image, "copy": image.clone(), "name": "x"})
    assert isinstance(out["image"], MetaTensor) and out["image"].meta["filename_or_obj"] == "x.png"
    assert torch.equal(out["image"].as_tensor(), out["copy"].as_tensor())
    assert out["name"] == "x"


def test_corruptd_missing_keys():
    with pytest.raises(KeyError):
        Corruptd("image", "contrast", 3)({"name": "x"})
    assert Corruptd("image", "contrast", 3, allow_missing_keys=True)({"name": "x"}) == {"name": "x"}


# --------------------------------------------------------------------------- grid figure


def test_plot_corruption_grid_writes_a_png(tmp_path: Path):
    image = MetaTensor(torch.from_numpy(grey_image(32)))
    path = plot_corruption_grid(image, tmp_path / "sub" / "grid.png", severities=(1, 5), seed=0, title="t", dpi=40)
    assert path == tmp_path / "sub" / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        width, height = png.size
    assert width > 3 * height, "13 columns by 2 rows"
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"], "no temporary file left behind"


def test_plot_corruption_grid_rejects_bad_severities(tmp_path: Path):
    with pytest.raises(ValueError):
        plot_corruption_grid(grey_image(16), tmp_path / "grid.png", severities=(0,))
    with pytest.raises(ValueError):
        plot_corruption_grid(grey_image(16), tmp_path / "grid.png", severities=())
    assert not (tmp_path / "grid.png").exists()
