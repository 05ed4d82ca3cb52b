"""MONAI metric classes and Ignite handlers built on the functional boundary metrics."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from monai.data import MetaTensor, decollate_batch, list_data_collate
from monai.handlers import from_engine
from monai.metrics import HausdorffDistanceMetric

from medcore_monai.handlers import HD95, BoundaryF1
from medcore_monai.metrics import BoundaryF1Metric, HD95Metric, compute_boundary_f1, compute_hd95


def square(size: int = 16, start: int = 4, side: int = 6, shift: int = 0) -> torch.Tensor:
    """[H, W] float mask with a square, optionally shifted down by `shift` rows."""
    mask = torch.zeros(size, size)
    mask[start + shift : start + shift + side, start : start + side] = 1.0
    return mask


def one_hot(foreground: torch.Tensor) -> torch.Tensor:
    """[H, W] -> [2, H, W] with background first."""
    return torch.stack([1.0 - foreground, foreground])


def with_spacing(image: torch.Tensor, spacing: tuple[float, float]) -> MetaTensor:
    """Channel-first 2D MetaTensor whose affine encodes `spacing` (MONAI keeps a 4x4 affine)."""
    affine = torch.diag(torch.tensor([*spacing, 1.0, 1.0], dtype=torch.float64))
    return MetaTensor(image, affine=affine)


# Batch of two: identical squares, and squares three rows apart.
GT_ITEMS = [square(), square()]
PRED_ITEMS = [square(), square(shift=3)]


def binary_batch(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items)[:, None]


def one_hot_batch(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([one_hot(item) for item in items])


def functional(fn, spacing=None, **kwargs) -> torch.Tensor:
    values = [fn(p.numpy(), g.numpy(), spacing=spacing, **kwargs) for p, g in zip(PRED_ITEMS, GT_ITEMS)]
    return torch.tensor(values, dtype=torch.float32)[:, None]


# --------------------------------------------------------------------------------------------------
# metric classes
# --------------------------------------------------------------------------------------------------


def test_binary_single_channel_input_matches_functional():
    bf1 = BoundaryF1Metric(tolerance=1.0)
    hd95 = HD95Metric()
    bf1_values = bf1(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS))
    hd95_values = hd95(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS))
    torch.testing.assert_close(bf1_values, functional(compute_boundary_f1, tolerance=1.0))
    torch.testing.assert_close(hd95_values, functional(compute_hd95))
    # Sanity on the hand-checkable values: identical squares, then a 3-row shift.
    torch.testing.assert_close(hd95_values, torch.tensor([[0.0], [3.0]]))


def test_one_hot_input_drops_background_unless_asked():
    pred, gt = one_hot_batch(PRED_ITEMS), one_hot_batch(GT_ITEMS)
    foreground_only = HD95Metric()(pred, gt)
    torch.testing.assert_close(foreground_only, functional(compute_hd95))

    with_background = HD95Metric(include_background=True)(pred, gt)
    assert with_background.shape == (2, 2)
    background = [compute_hd95(1 - p.numpy(), 1 - g.numpy()) for p, g in zip(PRED_ITEMS, GT_ITEMS)]
    torch.testing.assert_close(with_background[:, 0], torch.tensor(background))
    torch.testing.assert_close(with_background[:, 1:], foreground_only)


def test_single_channel_is_kept_even_without_background():
    values = BoundaryF1Metric(include_background=False)(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS))
    assert values.shape == (2, 1)


def test_list_of_channel_first_tensors():
    pred = [item[None] for item in PRED_ITEMS]
    gt = [item[None] for item in GT_ITEMS]
    torch.testing.assert_close(HD95Metric()(pred, gt), functional(compute_hd95))


def test_3d_input():
    cube = torch.zeros(1, 1, 10, 10, 10)
    cube[..., 2:7, 2:7, 2:7] = 1
    moved = torch.roll(cube, 2, dims=-1)
    torch.testing.assert_close(HD95Metric()(moved, cube), torch.tensor([[2.0]]))
    torch.testing.assert_close(HD95Metric()(moved, cube, spacing=(1.0, 1.0, 0.5)), torch.tensor([[1.0]]))


@pytest.mark.parametrize("mode", ["region", "contour"])
def test_non_default_modes_are_forwarded(mode):
    values = HD95Metric(mode=mode)(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS))
    torch.testing.assert_close(values, functional(compute_hd95, mode=mode))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal
def test_default_mode_equals_monai_hausdorff_metric():
    # Hand-checkable squares (0 and a 3-row shift) give the same numbers as MONAI's own metric;
    # tests/test_hd95_monai.py does the same on random ellipses.
    expected = HausdorffDistanceMetric(percentile=95, reduction="none")(
        one_hot_batch(PRED_ITEMS), one_hot_batch(GT_ITEMS), spacing=[2.0, 0.25]
    )
    values = HD95Metric()(one_hot_batch(PRED_ITEMS), one_hot_batch(GT_ITEMS), spacing=(2.0, 0.25))
    torch.testing.assert_close(values, expected)
    torch.testing.assert_close(values, torch.tensor([[0.0], [6.0]]))


def test_reductions_and_not_nans_accumulate_over_iterations():
    metric = HD95Metric(get_not_nans=True)
    metric(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS))  # 0 and 3
    metric(binary_batch([square(shift=1)]), binary_batch([square()]))  # 1
    value, not_nans = metric.aggregate()
    assert value.item() == pytest.approx((0.0 + 3.0 + 1.0) / 3)
    assert not_nans.item() == 3
    value, _ = metric.aggregate("sum")
    assert value.item() == pytest.approx(4.0)
    raw, raw_not_nans = metric.aggregate("none")
    torch.testing.assert_close(raw, torch.tensor([[0.0], [3.0], [1.0]]))
    torch.testing.assert_close(raw_not_nans, torch.ones(3, 1))
    # Aggregating must not disturb the buffer, and reset() must empty it.
    torch.testing.assert_close(metric.get_buffer(), torch.tensor([[0.0], [3.0], [1.0]]))
    metric.reset()
    metric(binary_batch([square()]), binary_batch([square()]))
    assert metric.aggregate()[0].item() == 0.0


def test_default_returns_tensor_and_mean_batch_keeps_classes():
    metric = BoundaryF1Metric(include_background=True, tolerance=0.0)
    metric(one_hot_batch(PRED_ITEMS), one_hot_batch(GT_ITEMS))
    mean = metric.aggregate()
    assert isinstance(mean, torch.Tensor) and mean.numel() == 1  # MONAI's "mean" keeps a length-1 dim
    per_class = metric.aggregate("mean_batch")
    assert per_class.shape == (2,)
    torch.testing.assert_close(per_class.mean(), mean.squeeze())


def test_empty_masks_follow_the_functional_policy():
    empty = torch.zeros(1, 1, 8, 8)
    blob = torch.zeros(1, 1, 8, 8)
    blob[..., 2:4, 2:4] = 1
    # Diagonal of an 8x8 image at 0.5 spacing: sqrt(4^2 + 4^2).
    values = HD95Metric()(torch.cat([empty, blob]), torch.cat([empty, empty]), spacing=0.5)
    torch.testing.assert_close(values, torch.tensor([[0.0], [32**0.5]]))
    bf1 = BoundaryF1Metric()(torch.cat([empty, blob]), torch.cat([empty, empty]))
    torch.testing.assert_close(bf1, torch.tensor([[1.0], [0.0]]))


# --------------------------------------------------------------------------------------------------
# spacing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "expected"),
    [
        (0.5, [0.0, 1.5]),
        ((2.0, 0.25), [0.0, 6.0]),  # per axis: the shift is along rows (axis 0)
        ([0.5, 2.0], [0.0, 1.5]),  # length == 2 spatial axes: per axis as in MONAI (per image would give 6)
        ([[1.0, 1.0], [0.5, 0.5]], [0.0, 1.5]),  # one per-axis spacing per image
        (torch.tensor([[1.0, 1.0], [3.0, 1.0]]), [0.0, 9.0]),
    ],
    ids=["scalar", "tuple", "list-per-axis", "per-image", "tensor-per-image"],
)
def test_spacing_keyword(spacing, expected):
    values = HD95Metric()(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS), spacing=spacing)
    torch.testing.assert_close(values, torch.tensor(expected)[:, None])


def test_flat_spacing_per_image_when_batch_size_differs_from_dims():
    pred = binary_batch([square(), square(shift=3), square(shift=2)])
    gt = binary_batch([square()] * 3)
    values = HD95Metric()(pred, gt, spacing=[1.0, 0.5, 2.0])
    torch.testing.assert_close(values, torch.tensor([[0.0], [1.5], [4.0]]))


def test_bad_spacing_raises():
    with pytest.raises(ValueError, match="spacing"):
        HD95Metric()(binary_batch(PRED_ITEMS), binary_batch(GT_ITEMS), spacing=[1.0, 2.0, 3.0])


def test_spacing_from_batched_meta_tensor():
    # Per-image pixdim: the second image's 3-row shift is 3 * 2.0 mm.
    labels = list_data_collate(
        [with_spacing(GT_ITEMS[0][None], (0.5, 0.5)), with_spacing(GT_ITEMS[1][None], (2.0, 1.0))]
    )
    assert isinstance(labels, MetaTensor) and labels.is_batch
    values = HD95Metric()(binary_batch(PRED_ITEMS), labels)
    torch.testing.assert_close(values, torch.tensor([[0.0], [6.0]]))


def test_spacing_from_decollated_meta_tensors_and_overrides():
    labels = [with_spacing(g[None], (0.5, 0.5)) for g in GT_ITEMS]
    preds = [p[None] for p in PRED_ITEMS]
    torch.testing.assert_close(HD95Metric()(preds, labels), torch.tensor([[0.0], [1.5]]))
    # A call-time spacing wins over the metadata; the flag switches the metadata off.
    torch.testing.assert_close(HD95Metric()(preds, labels, spacing=1.0), torch.tensor([[0.0], [3.0]]))
    torch.testing.assert_close(HD95Metric(use_meta_spacing=False)(preds, labels), torch.tensor([[0.0], [3.0]]))
    # BF1 tolerance is in mm once spacing is known: the 1.5 mm shift is within 1.5 but not 1.0.
    torch.testing.assert_close(BoundaryF1Metric(tolerance=1.5)(preds, labels), torch.ones(2, 1))
    assert BoundaryF1Metric(tolerance=1.0)(preds, labels)[1, 0] < 1.0


def test_meta_tensor_without_affine_means_pixels():
    labels = MetaTensor(binary_batch(GT_ITEMS))
    torch.testing.assert_close(HD95Metric()(binary_batch(PRED_ITEMS), labels), torch.tensor([[0.0], [3.0]]))


def test_unusable_pixdim_falls_back_to_pixels_with_a_warning():
    # A 3x3 affine describes 2 spatial axes, which cannot serve a 3D volume.
    cube = torch.zeros(1, 1, 8, 8, 8)
    cube[..., 2:5, 2:5, 2:5] = 1
    labels = MetaTensor(cube, affine=torch.diag(torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)))
    with pytest.warns(UserWarning, match="pixdim"):
        values = HD95Metric()(torch.roll(cube, 1, dims=-1), labels)
    torch.testing.assert_close(values, torch.tensor([[1.0]]))


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def test_invalid_inputs_raise():
    metric = BoundaryF1Metric()
    with pytest.raises(ValueError, match="same shape"):
        metric(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="B, C, H, W"):
        metric(torch.zeros(1, 1, 1, 8, 8, 8), torch.zeros(1, 1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="binary"):
        metric(torch.full((1, 1, 8, 8), 0.5), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="ground truth"):
        metric(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="mode"):
        HD95Metric(mode="volume")


# --------------------------------------------------------------------------------------------------
# Ignite handlers
# --------------------------------------------------------------------------------------------------


def run_evaluation(handler, batches: list[tuple[torch.Tensor, MetaTensor]], name: str) -> Engine:
    """Engine whose process function emits decollated {'pred', 'label'} dicts, like MONAI evaluators."""

    def process(engine: Engine, batch: tuple[torch.Tensor, MetaTensor]) -> list[dict]:
        pred, label = batch
        return [{"pred": p, "label": y} for p, y in zip(decollate_batch(pred), decollate_batch(label))]

    engine = Engine(process)
    handler.attach(engine, name)
    engine.run(batches, max_epochs=1)
    return engine


def labelled_batch(items: list[torch.Tensor], spacing: tuple[float, float]) -> MetaTensor:
    return list_data_collate([with_spacing(item[None], spacing) for item in items])


def test_hd95_handler_uses_label_pixdim():
    batches = [
        (binary_batch(PRED_ITEMS), labelled_batch(GT_ITEMS, (0.5, 0.5))),  # 0 and 1.5 mm
        (binary_batch([square(shift=2)]), labelled_batch([square()], (2.0, 2.0))),  # 4 mm
    ]
    handler = HD95(output_transform=from_engine(["pred", "label"]))
    engine = run_evaluation(handler, batches, "val_hd95")
    assert engine.state.metrics["val_hd95"] == pytest.approx((0.0 + 1.5 + 4.0) / 3)
    torch.testing.assert_close(engine.state.metric_details["val_hd95"], torch.tensor([[0.0], [1.5], [4.0]]))


def test_bf1_handler_mean_over_iterations():
    batches = [
        (one_hot_batch(PRED_ITEMS), one_hot_batch(GT_ITEMS)),
        (one_hot_batch([square(shift=1)]), one_hot_batch([square()])),
    ]
    handler = BoundaryF1(tolerance=1.0, output_transform=from_engine(["pred", "label"]))
    engine = run_evaluation(handler, batches, "val_bf1")
    # Identical squares score 1, the 1-row shift is within tolerance 1; the 3-row shift scores
    # whatever the functional API says.
    shifted_by_three = compute_boundary_f1(PRED_ITEMS[1].numpy(), GT_ITEMS[1].numpy(), tolerance=1.0)
    assert shifted_by_three < 1.0
    assert engine.state.metrics["val_bf1"] == pytest.approx((1.0 + shifted_by_three + 1.0) / 3)


def test_handlers_build_from_bundle_config():
    config = {
        "key_val_metric": {
            "val_bf1": {
                "_target_": "medcore_monai.handlers.BoundaryF1",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            },
            "val_hd95": {"_target_": "medcore_monai.handlers.HD95", "mode": "region"},
            "val_hd95_old": {"_target_": "medcore_monai.handlers.HD95", "mode": "contour"},
            "val_hd95_monai": {"_target_": "medcore_monai.handlers.HD95"},
        }
    }
    parser = ConfigParser(config)
    metrics = parser.get_parsed_content("key_val_metric")
    assert isinstance(metrics["val_bf1"], BoundaryF1)
    assert isinstance(metrics["val_hd95"].metric_fn, HD95Metric)
    assert metrics["val_hd95"].metric_fn.mode == "region"
    assert metrics["val_hd95_old"].metric_fn.mode == "contour"
    assert metrics["val_hd95_monai"].metric_fn.mode == "surface"
