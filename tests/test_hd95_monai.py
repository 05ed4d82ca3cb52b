"""The default HD95 equals MONAI's ``HausdorffDistanceMetric(percentile=95)`` (issue 10, item 7).

MONAI is always run here on the full, uncropped images, so equality also checks that the union-box
crop applied before calling MONAI does not change the value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.handlers import from_engine
from monai.metrics import HausdorffDistanceMetric, compute_hausdorff_distance

from medcore_monai.handlers import HD95
from medcore_monai.metrics import HD95Metric, compute_hd95, image_diagonal

# MONAI 1.5+ passes its own deprecated argument internally; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

REL = 1e-6


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def random_ellipsoid(rng: np.random.Generator, shape: tuple[int, ...], touch_border: bool = False) -> np.ndarray:
    """Filled ellipse (2D) or ellipsoid (3D), rotated in the first two axes, never empty.

    With ``touch_border`` the centre lies within one pixel of a random face of the image; the shape
    contains a ball wider than that, so it is cut by the border (where edges along the border matter).
    """
    centre = [rng.uniform(0.3 * n, 0.7 * n) for n in shape]
    radii = [rng.uniform(0.12 * n, 0.3 * n) for n in shape]
    if touch_border:
        axis = int(rng.integers(len(shape)))
        centre[axis] = rng.uniform(0, 1) if rng.random() < 0.5 else shape[axis] - 1 - rng.uniform(0, 1)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    offsets = [grid - c for grid, c in zip(grids, centre)]
    angle = rng.uniform(0, math.pi)
    offsets[0], offsets[1] = (
        offsets[0] * math.cos(angle) + offsets[1] * math.sin(angle),
        -offsets[0] * math.sin(angle) + offsets[1] * math.cos(angle),
    )
    mask = sum((offset / radius) ** 2 for offset, radius in zip(offsets, radii)) <= 1.0
    mask[tuple(int(c) for c in np.clip(centre, 0, np.array(shape) - 1))] = True
    return mask


def touches_border(mask: np.ndarray) -> bool:
    interior = np.zeros(mask.shape, dtype=bool)
    interior[tuple(slice(1, -1) for _ in mask.shape)] = True
    return bool(mask[~interior].any())


def monai_hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...]) -> float:
    """MONAI's HD95 on the full images (no cropping on our side)."""
    value = compute_hausdorff_distance(
        torch.as_tensor(pred)[None, None],
        torch.as_tensor(gt)[None, None],
        include_background=True,
        percentile=95,
        spacing=list(spacing),
    )
    return value.item()


CASES = {
    "2d-iso": ((64, 64), (1.0, 1.0)),
    "2d-aniso": ((72, 60), (0.7, 1.3)),
    "3d-iso": ((28, 24, 20), (1.0, 1.0, 1.0)),
    "3d-aniso": ((32, 32, 16), (0.8, 0.8, 2.5)),
}


# --------------------------------------------------------------------------------------------------
# functional API
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("touch_border", [False, True], ids=["inside", "border"])
@pytest.mark.parametrize(("shape", "spacing"), CASES.values(), ids=CASES.keys())
def test_hd95_equals_monai_on_random_ellipsoids(shape, spacing, touch_border):
    rng = np.random.default_rng(sum(shape) + 7 * touch_border)
    for _ in range(6 if len(shape) == 2 else 3):
        pred = random_ellipsoid(rng, shape, touch_border)
        gt = random_ellipsoid(rng, shape, touch_border)
        if touch_border:
            assert touches_border(pred) and touches_border(gt)
        expected = monai_hd95(pred, gt, spacing)
        assert math.isfinite(expected) and expected > 0
        assert compute_hd95(pred, gt, spacing=spacing) == pytest.approx(expected, rel=REL)
        # torch and MetaTensor inputs go through the same path.
        as_meta = MetaTensor(torch.as_tensor(pred, dtype=torch.float32))
        assert compute_hd95(as_meta, torch.as_tensor(gt), spacing=spacing) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((1024, 1024), (0.7, 1.3)), ((96, 128, 40), (0.8, 0.8, 2.5))],
    ids=["2d-1024", "3d-volume"],
)
def test_small_far_apart_lesions_in_large_images_equal_monai(shape, spacing):
    # Small structures in opposite corners (one cut by the border): the crop is the union box, far
    # smaller than the image, and must not change the value.
    small = tuple(n // 8 for n in shape)
    rng = np.random.default_rng(11)
    near_origin = np.zeros(shape, dtype=bool)
    near_origin[tuple(slice(0, n) for n in small)] = random_ellipsoid(rng, small, touch_border=True)
    far_corner = np.zeros(shape, dtype=bool)
    far_corner[tuple(slice(n - s - 3, n - 3) for n, s in zip(shape, small))] = random_ellipsoid(rng, small)
    expected = monai_hd95(near_origin, far_corner, spacing)
    assert compute_hd95(near_origin, far_corner, spacing=spacing) == pytest.approx(expected, rel=REL)


def test_scalar_and_missing_spacing_match_monai():
    rng = np.random.default_rng(3)
    pred, gt = random_ellipsoid(rng, (48, 40)), random_ellipsoid(rng, (48, 40))
    assert compute_hd95(pred, gt) == pytest.approx(monai_hd95(pred, gt, (1.0, 1.0)), rel=REL)
    assert compute_hd95(pred, gt, spacing=0.6) == pytest.approx(monai_hd95(pred, gt, (0.6, 0.6)), rel=REL)


EMPTY_CASES = {
    "2d": ((40, 30), (0.7, 1.3)),
    "3d": ((12, 10, 8), (0.8, 0.8, 2.5)),
}


@pytest.mark.parametrize("mode", ["surface", "contour", "region"])
@pytest.mark.parametrize(("shape", "spacing"), EMPTY_CASES.values(), ids=EMPTY_CASES.keys())
def test_empty_mask_policy_replaces_monai_nan(shape, spacing, mode):
    # MONAI gives NaN (or inf) here; the project policy gives 0 for two empty masks and the image
    # diagonal for a miss, in every mode.
    empty = np.zeros(shape, dtype=bool)
    blob = random_ellipsoid(np.random.default_rng(0), shape)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))
    assert compute_hd95(empty, empty, spacing=spacing, mode=mode) == 0.0
    assert compute_hd95(blob, empty, spacing=spacing, mode=mode) == pytest.approx(diagonal)
    assert compute_hd95(empty, blob, spacing=spacing, mode=mode) == pytest.approx(diagonal)
    assert image_diagonal(shape, spacing) == pytest.approx(diagonal)


def test_contour_mode_is_the_pre_0_2_definition_and_differs():
    # On smooth shapes the old inner-contour numbers sit within a few percent of MONAI's but are
    # not equal: the point of the change.
    rng = np.random.default_rng(5)
    differences = []
    for _ in range(6):
        pred, gt = random_ellipsoid(rng, (32, 32, 16)), random_ellipsoid(rng, (32, 32, 16))
        new = compute_hd95(pred, gt, spacing=(0.8, 0.8, 2.5))
        old = compute_hd95(pred, gt, spacing=(0.8, 0.8, 2.5), mode="contour")
        differences.append(abs(old - new) / new)
    assert max(differences) > 1e-3
    assert max(differences) < 0.5


# --------------------------------------------------------------------------------------------------
# metric class and Ignite handler
# --------------------------------------------------------------------------------------------------


def one_hot(masks: list[np.ndarray]) -> torch.Tensor:
    """[B, 2, ...] float one-hot batch (background first) from binary foreground masks."""
    foreground = torch.as_tensor(np.stack(masks), dtype=torch.float32)[:, None]
    return torch.cat([1.0 - foreground, foreground], dim=1)


def random_batch(shape: tuple[int, ...], size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds = [random_ellipsoid(rng, shape, touch_border=i % 2 == 1) for i in range(size)]
    gts = [random_ellipsoid(rng, shape, touch_border=i % 2 == 1) for i in range(size)]
    return preds, gts


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize(("shape", "spacing"), [CASES["2d-aniso"], CASES["3d-aniso"]], ids=["2d", "3d"])
def test_cumulative_metric_equals_monai_metric(shape, spacing, include_background):
    preds, gts = random_batch(shape, 3, seed=len(shape))
    y_pred, y = one_hot(preds), one_hot(gts)
    ours = HD95Metric(include_background=include_background, reduction="none")
    monai_metric = HausdorffDistanceMetric(include_background=include_background, percentile=95, reduction="none")
    values = ours(y_pred, y, spacing=spacing)
    expected = monai_metric(y_pred, y, spacing=list(spacing))
    assert values.shape == expected.shape == (3, 2 if include_background else 1)
    torch.testing.assert_close(values, expected, rtol=REL, atol=0.0)
    torch.testing.assert_close(ours.aggregate(), monai_metric.aggregate(), rtol=REL, atol=0.0)


def test_single_channel_metric_equals_monai_with_background_included():
    # MONAI treats a lone channel as channel 0, so it must be told to keep it.
    preds, gts = random_batch((56, 64), 2, seed=9)
    y_pred = torch.as_tensor(np.stack(preds), dtype=torch.float32)[:, None]
    y = torch.as_tensor(np.stack(gts), dtype=torch.float32)[:, None]
    expected = HausdorffDistanceMetric(include_background=True, percentile=95)(y_pred, y, spacing=[0.7, 1.3])
    torch.testing.assert_close(HD95Metric()(y_pred, y, spacing=(0.7, 1.3)), expected, rtol=REL, atol=0.0)


def test_metric_reads_meta_pixdim_like_monai_spacing():
    preds, gts = random_batch((40, 48), 2, seed=4)
    spacing = (0.7, 1.3)
    affine = torch.diag(torch.tensor([*spacing, 1.0, 1.0], dtype=torch.float64))
    labels = list_data_collate([MetaTensor(one_hot([g])[0], affine=affine) for g in gts])
    expected = HausdorffDistanceMetric(percentile=95)(one_hot(preds), one_hot(gts), spacing=list(spacing))
    torch.testing.assert_close(HD95Metric()(one_hot(preds), labels), expected, rtol=REL, atol=0.0)


@pytest.mark.parametrize("mode", ["surface", "contour", "region"])
def test_metric_and_handler_accept_every_mode(mode):
    preds, gts = random_batch((32, 36), 2, seed=6)
    values = HD95Metric(mode=mode)(one_hot(preds), one_hot(gts), spacing=(0.7, 1.3))
    expected = [compute_hd95(p, g, spacing=(0.7, 1.3), mode=mode) for p, g in zip(preds, gts)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float32)[:, None])
    assert HD95(mode=mode).metric_fn.mode == mode


def test_handler_equals_monai_metric_with_label_pixdim():
    spacing = (0.8, 0.8, 2.5)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    batches, expected = [], []
    for seed in (1, 2):
        preds, gts = random_batch((24, 24, 12), 2, seed=seed)
        labels = list_data_collate([MetaTensor(one_hot([g])[0], affine=affine) for g in gts])
        batches.append((one_hot(preds), labels))
        monai_metric = HausdorffDistanceMetric(percentile=95, reduction="none")
        expected.append(monai_metric(one_hot(preds), one_hot(gts), spacing=list(spacing)))

    def process(engine: Engine, batch: tuple[torch.Tensor, MetaTensor]) -> list[dict]:
        pred, label = batch
        return [{"pred": p, "label": y} for p, y in zip(decollate_batch(pred), decollate_batch(label))]

    engine = Engine(process)
    HD95(output_transform=from_engine(["pred", "label"])).attach(engine, "val_hd95")
    engine.run(batches, max_epochs=1)
    expected_all = torch.cat(expected)
    torch.testing.assert_close(engine.state.metric_details["val_hd95"], expected_all, rtol=REL, atol=0.0)
    assert engine.state.metrics["val_hd95"] == pytest.approx(expected_all.mean().item(), rel=REL)
