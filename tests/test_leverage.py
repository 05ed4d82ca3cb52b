"""Boundary-leverage analysis: Sobel, band, ratios, floor, dC guard, BLR95 summary."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medcore_monai.pruning.leverage import (
    MIN_DELTA_PCT,
    BLRSummary,
    analyze_leverage,
    blr95,
    boundary_band_mask,
    gradient_floor,
    grid_steps,
    leverage_histogram_data,
    leverage_ratios,
    sobel_gradient_magnitude,
    step_leverage,
)


def _ramp(n: int = 2, size: int = 16, slope: float = 0.5, vertical: bool = False) -> torch.Tensor:
    line = torch.arange(size, dtype=torch.float64) * slope
    field = line[:, None].expand(size, size) if vertical else line[None, :].expand(size, size)
    return field.expand(n, size, size).clone()


def _square_masks(n: int = 2, size: int = 16, lo: int = 4, hi: int = 12) -> np.ndarray:
    masks = np.zeros((n, size, size), dtype=bool)
    masks[:, lo:hi, lo:hi] = True
    return masks


def _step(lambda95: float, lambda_region: float = 1.0) -> dict[str, float]:
    return {"lambda95": lambda95, "lambda_mean": lambda95, "lambda_region": lambda_region}


# --------------------------------------------------------------------------------------------------
# Sobel
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vertical", [False, True])
def test_sobel_on_linear_ramp_equals_slope_inside(vertical):
    grad = sobel_gradient_magnitude(_ramp(slope=0.5, vertical=vertical))
    assert grad.shape == (2, 16, 16)
    assert torch.allclose(grad[:, 1:-1, 1:-1], torch.full_like(grad[:, 1:-1, 1:-1], 0.5))
    # Replicate padding: a one-sided difference (half the slope) on the two edges across the ramp.
    edge = grad[:, :, 0] if not vertical else grad[:, 0, :]
    assert torch.allclose(edge, torch.full_like(edge, 0.25))


def test_sobel_diagonal_ramp_and_shapes():
    size = 12
    y, x = torch.meshgrid(
        torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij"
    )
    field = (3.0 * x + 4.0 * y)[None, None]  # |grad| = 5
    grad = sobel_gradient_magnitude(field)
    assert grad.shape == (1, 1, size, size)
    assert torch.allclose(grad[..., 1:-1, 1:-1], torch.full((1, 1, size - 2, size - 2), 5.0, dtype=torch.float64))
    assert sobel_gradient_magnitude(field[0, 0]).shape == (size, size)


def test_sobel_constant_field_is_zero_and_fp16_is_promoted():
    grad = sobel_gradient_magnitude(torch.full((1, 8, 8), 3.0, dtype=torch.float16))
    assert grad.dtype == torch.float32
    assert torch.count_nonzero(grad) == 0


def test_sobel_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        sobel_gradient_magnitude(torch.zeros(2, 3, 8, 8))


# --------------------------------------------------------------------------------------------------
# Boundary band
# --------------------------------------------------------------------------------------------------


def test_band_on_square_contains_pixels_within_tau_on_both_sides():
    band = boundary_band_mask(_square_masks(n=1)[0], tau=2)[0]
    expected = np.zeros((16, 16), dtype=bool)
    expected[2:14, 2:14] = True  # up to 2 px outside
    expected[6:10, 6:10] = False  # more than 2 px inside
    # Outer corners lie at Euclidean distance sqrt(2) * 2 > 2 and sqrt(5) > 2 from the square.
    for r, c in [(2, 2), (2, 3), (3, 2)]:
        for rr, cc in [(r, c), (r, 15 - c), (15 - r, c), (15 - r, 15 - c)]:
            expected[rr, cc] = False
    np.testing.assert_array_equal(band, expected)


def test_band_empty_for_uniform_masks_and_accepts_channel_axis():
    masks = np.zeros((3, 1, 8, 8))
    masks[1] = 1.0
    masks[2, 0, 2:6, 2:6] = 1.0
    band = boundary_band_mask(torch.as_tensor(masks), tau=1)
    assert band.shape == (3, 8, 8)
    assert not band[0].any() and not band[1].any() and band[2].any()


def test_band_rejects_negative_tau():
    with pytest.raises(ValueError):
        boundary_band_mask(np.ones((4, 4)), tau=-1)


# --------------------------------------------------------------------------------------------------
# Ratios and floor
# --------------------------------------------------------------------------------------------------


def test_ratio_is_constant_shift_over_slope_on_a_ramp():
    z = _ramp(slope=0.5)
    ratios = leverage_ratios(z, z + 0.2, _square_masks(), tau=3.0)
    band = boundary_band_mask(_square_masks(), 3.0)
    assert ratios.shape == (int(band.sum()),)
    # The band stays 1 px away from the left/right image edges, where Sobel sees half the slope.
    assert band[:, :, 0].sum() == 0 and band[:, :, -1].sum() == 0
    np.testing.assert_allclose(ratios, 0.2 / 0.5)


def test_floor_is_fifth_percentile_of_positive_gradients():
    grad = torch.tensor([0.0, 0.0, *range(1, 101)], dtype=torch.float64)
    assert gradient_floor(grad) == pytest.approx(np.percentile(np.arange(1, 101), 5.0))
    assert gradient_floor(torch.zeros(10)) == 1e-6
    assert gradient_floor(torch.full((10,), 1e-9)) == 1e-6


def test_floor_caps_ratios_on_flat_logits():
    # Flat left half, unit-slope ramp on the right: |grad| is 0 (cols 0-6), 0.5 (cols 7 and 15), 1 elsewhere.
    z = torch.zeros(1, 16, 16, dtype=torch.float64)
    z[:, :, 8:] = torch.arange(1, 9, dtype=torch.float64)
    floor = gradient_floor(sobel_gradient_magnitude(z))
    assert floor == pytest.approx(0.5)
    ratios = leverage_ratios(z, z + 1.0, _square_masks(n=1), tau=3.0)
    # Flat band pixels divide by the floor instead of by zero; ramp pixels by their slope.
    assert np.isfinite(ratios).all()
    assert ratios.max() == pytest.approx(1.0 / 0.5)
    assert ratios.min() == pytest.approx(1.0)


def test_floor_is_pooled_over_images():
    flat = _ramp(n=1, slope=0.01)
    # 40 steep images make the flat image's gradients less than 5 % of the pool, so the pooled floor is the
    # steep images' edge value (1.0, one-sided Sobel) and the flat image's ratios are capped by it.
    pool = torch.cat([_ramp(n=40, slope=2.0), flat])
    masks = _square_masks(n=41)
    alone = leverage_ratios(flat, flat + 1.0, masks[:1])
    pooled = leverage_ratios(pool, pool + 1.0, masks)
    np.testing.assert_allclose(alone, 1.0 / 0.01)
    per_image = alone.size
    np.testing.assert_allclose(pooled[-per_image:], 1.0 / 1.0)
    np.testing.assert_allclose(pooled[:-per_image], 1.0 / 2.0)


def test_ratios_shape_mismatch_and_precomputed_band():
    z = _ramp()
    with pytest.raises(ValueError, match="differ in shape"):
        leverage_ratios(z, z[:1], _square_masks())
    with pytest.raises(ValueError, match="logit grid"):
        leverage_ratios(z, z, _square_masks(size=8))
    band = boundary_band_mask(_square_masks(), 3.0)
    np.testing.assert_array_equal(
        leverage_ratios(z, z + 1, None, band=band), leverage_ratios(z, z + 1, _square_masks())
    )


# --------------------------------------------------------------------------------------------------
# Step leverage
# --------------------------------------------------------------------------------------------------


def test_step_leverage_values():
    z = _ramp(slope=0.5)
    result = step_leverage(z, z + 0.2, _square_masks(), delta_params_pct=4.0, tau=3.0)
    assert result["lambda95"] == pytest.approx(0.4 / 4.0)
    assert result["lambda_mean"] == pytest.approx(0.4 / 4.0)
    assert result["lambda_region"] == pytest.approx(0.2 / 4.0)
    assert result["n_band_pixels"] == boundary_band_mask(_square_masks(), 3.0).sum()


@pytest.mark.parametrize("delta", [0.0, MIN_DELTA_PCT, -3.0, float("nan")])
def test_step_leverage_discards_small_delta(delta):
    z = _ramp()
    assert step_leverage(z, z + 1, _square_masks(), delta, tau=3.0) is None


def test_step_leverage_without_boundary_raises():
    z = _ramp()
    with pytest.raises(ValueError, match="boundary"):
        step_leverage(z, z + 1, np.zeros((2, 16, 16)), 1.0)


# --------------------------------------------------------------------------------------------------
# BLR95 summary
# --------------------------------------------------------------------------------------------------


def test_blr95_is_ratio_of_medians():
    head = [_step(v, r) for v, r in [(1.0, 2.0), (3.0, 2.0), (9.0, 6.0)]]
    mlp = [_step(v, r) for v, r in [(0.5, 1.0), (1.0, 1.0), (100.0, 1.0), (2.0, 1.0)]]
    summary = blr95(head, mlp, n_bootstrap=200)
    assert isinstance(summary, BLRSummary)
    assert summary.blr95 == pytest.approx(3.0 / 1.5)
    assert summary.rlr == pytest.approx(2.0 / 1.0)
    assert summary.bsr == pytest.approx(1.0)
    assert summary.win_rate95 is None and summary.n_pairs == 0
    assert summary.n_head_steps == 3 and summary.n_mlp_steps == 4


def test_blr95_skips_discarded_steps_and_guards_zero_denominator():
    summary = blr95([_step(2.0), None], [_step(0.0, 0.0), None], n_bootstrap=10)
    assert summary.n_head_steps == 1 and summary.n_mlp_steps == 1
    assert np.isfinite(summary.blr95) and summary.blr95 == pytest.approx(2.0 / 1e-9)
    with pytest.raises(ValueError, match="valid"):
        blr95([None], [_step(1.0)])


def test_bootstrap_ci_contains_point_and_is_reproducible():
    rng = np.random.default_rng(1)
    head = [_step(v) for v in rng.lognormal(1.0, 0.5, size=20)]
    mlp = [_step(v) for v in rng.lognormal(0.0, 0.5, size=20)]
    first = blr95(head, mlp, n_bootstrap=500, seed=7)
    again = blr95(head, mlp, n_bootstrap=500, seed=7)
    other = blr95(head, mlp, n_bootstrap=500, seed=8)
    assert first.ci_low <= first.blr95 <= first.ci_high
    assert first.ci_low < first.ci_high
    assert (first.ci_low, first.ci_high) == (again.ci_low, again.ci_high)
    assert (first.ci_low, first.ci_high) != (other.ci_low, other.ci_high)
    assert first.ci_level == 0.95 and first.seed == 7


def test_win_rate_by_index_and_explicit_pairs():
    head = [_step(v) for v in [2.0, 1.0, 5.0, 3.0]]
    mlp = [_step(v) for v in [1.0, 1.0, 4.0, 4.0]]
    by_index = blr95(head, mlp, n_bootstrap=10, pairs="index")
    assert by_index.n_pairs == 4
    assert by_index.win_rate95 == pytest.approx(0.5)  # ties do not count as wins
    assert by_index.diff_median95 == pytest.approx(np.median([1.0, 0.0, 1.0, -1.0]))
    explicit = blr95(head, mlp, n_bootstrap=10, pairs=[(0, 0), (2, 3)])
    assert explicit.n_pairs == 2 and explicit.win_rate95 == pytest.approx(1.0)
    with_gap = blr95([*head[:3], None], mlp, n_bootstrap=10, pairs="index")
    assert with_gap.n_pairs == 3
    with pytest.raises(ValueError, match="as many"):
        blr95(head[:3], mlp, pairs="index")
    with pytest.raises(IndexError):
        blr95(head, mlp, pairs=[(9, 0)])


def test_to_dict_is_plain():
    summary = blr95([_step(2.0)], [_step(1.0)], n_bootstrap=5, pairs="index")
    out = summary.to_dict()
    assert out["blr95"] == pytest.approx(2.0) and out["win_rate95"] == 1.0
    assert all(isinstance(v, (int, float, type(None))) for v in out.values())


# --------------------------------------------------------------------------------------------------
# Grid helper, end-to-end analysis, histogram data
# --------------------------------------------------------------------------------------------------


def test_grid_steps_pairs_share_the_start_point():
    grid = grid_steps(3, 4)
    assert len(grid.head) == 2 * 4 and len(grid.mlp) == 3 * 3
    assert len(grid.pairs) == 2 * 3
    for h, m in grid.pairs:
        assert grid.head[h][0] == grid.mlp[m][0]


def test_analyze_leverage_end_to_end():
    z = _ramp(slope=0.5)
    masks = _square_masks()
    head_steps = [(z, z + 0.4, 2.0), (z, z + 0.6, 2.0)]
    mlp_steps = [(z, z + 0.1, 2.0), (z, z + 5.0, 0.0)]  # second MLP step is discarded (dC = 0)
    out = analyze_leverage(head_steps, mlp_steps, masks, tau=3.0, pairs="index", n_bootstrap=50, keep_ratios=True)
    assert out["mlp_steps"][1] is None
    summary = out["summary"]
    # Head lambda95 = 0.8 / 2 and 1.2 / 2 (median 0.5); MLP lambda95 = 0.2 / 2.
    assert summary["blr95"] == pytest.approx(0.5 / 0.1)
    assert summary["n_pairs"] == 1 and summary["win_rate95"] == 1.0
    band_pixels = int(boundary_band_mask(masks, 3.0).sum())
    assert out["head_ratios"].size == 2 * band_pixels and out["mlp_ratios"].size == band_pixels


def test_histogram_data_fractions():
    data = leverage_histogram_data(np.array([0.0, 0.1, 1.0, 10.0]), np.array([1.0, 1.0]), n_bins=10)
    assert data["edges"].size == 11
    assert data["edges"][0] == pytest.approx(0.1) and data["edges"][-1] == pytest.approx(10.0)
    assert data["head_fraction"].sum() == pytest.approx(1.0)
    assert data["mlp_fraction"].sum() == pytest.approx(1.0)
    assert data["head_zero_fraction"] == pytest.approx(0.25) and data["mlp_zero_fraction"] == 0.0
