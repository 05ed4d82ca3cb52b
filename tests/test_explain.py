"""Transport-path attributions: the axioms on models with known Shapley values, the flow, paths and faithfulness."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medcore_monai.explain import (
    FlowConfig,
    TransportPath,
    boundary_band,
    deletion_insertion,
    field_mismatch,
    integrated_gradients,
    invert,
    load_flow,
    path_attribution,
    round_trip_error,
    save_flow,
    straight_path,
    train_flow,
)
from medcore_monai.explain.attribution import gradient_shap, occlusion


def exact_shapley(f, x: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Shapley values of the game v(S) = f(x on S, baseline elsewhere), by enumerating every coalition."""
    n = x.numel()
    flat_x, flat_b = x.flatten(), baseline.flatten()

    def value(coalition: tuple[int, ...]) -> float:
        point = flat_b.clone()
        point[list(coalition)] = flat_x[list(coalition)]
        return float(f(point.view(1, *x.shape))[0])

    phi = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                phi[i] += weight * (value(tuple(sorted(coalition + (i,)))) - value(coalition))
    return phi.view(x.shape)


def curved_path(x: torch.Tensor, baseline: torch.Tensor, segments: int = 7, seed: int = 0) -> TransportPath:
    """A polyline that wanders away from the straight line between ``baseline`` and ``x``."""
    generator = torch.Generator().manual_seed(seed)
    times = torch.linspace(0, 1, segments + 1, dtype=torch.float64)
    bend = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    nodes = [baseline + t * (x - baseline) + math.sin(math.pi * t) * bend for t in times.tolist()]
    return TransportPath(torch.stack(nodes), times)


def test_linear_model_attribution_is_the_exact_shapley_value_on_any_path():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(1, 2, 2, generator=generator, dtype=torch.float64)
    x = torch.randn(1, 2, 2, generator=generator, dtype=torch.float64)
    baseline = torch.randn(1, 2, 2, generator=generator, dtype=torch.float64)

    def f(z):
        return (z * w).sum((1, 2, 3)) + 0.3

    attribution = path_attribution(f, curved_path(x, baseline), points=2)
    torch.testing.assert_close(attribution.values, exact_shapley(f, x, baseline), rtol=1e-10, atol=1e-10)
    assert abs(attribution.completeness_gap) < 1e-10


def test_additive_model_attribution_is_the_exact_shapley_value_on_a_curved_path():
    generator = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(1, 2, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    x = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    baseline = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)

    def f(z):  # a sum of one cubic per pixel: Shapley value = g_i(x_i) - g_i(b_i)
        return (a * z**3 + b * z**2 + c * z).sum((1, 2, 3))

    attribution = path_attribution(f, curved_path(x, baseline, segments=5), points=2)
    shapley = exact_shapley(f, x, baseline)
    torch.testing.assert_close(attribution.values, shapley, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(shapley, a * (x**3 - baseline**3) + b * (x**2 - baseline**2) + c * (x - baseline))


def interacting(z: torch.Tensor) -> torch.Tensor:
    """A cubic with interactions between pixels (Gauss-Legendre with 2 points is exact on every segment)."""
    flat = z.flatten(1)
    u = flat @ torch.linspace(-1, 1, flat.shape[1], dtype=z.dtype)
    v = flat @ torch.cos(torch.arange(flat.shape[1], dtype=z.dtype))
    return u**3 + u * v - 0.5 * v**2


def test_attribution_is_invariant_to_reparameterising_the_path():
    generator = torch.Generator().manual_seed(3)
    x, baseline = (torch.randn(2, 3, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    path = curved_path(x, baseline)
    once = path_attribution(interacting, path, points=2).values
    refined = path_attribution(interacting, path.refined(3), points=2).values
    # a different speed along the same polyline: nodes bunched near the baseline
    squeezed = TransportPath(path.refined(4).nodes, path.refined(4).times ** 2)
    torch.testing.assert_close(refined, once, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path_attribution(interacting, squeezed, points=2).values, once, rtol=1e-9, atol=1e-9)
    assert (once - path_attribution(interacting, straight_path(x, baseline), points=2).values).abs().max() > 1e-3


def test_on_a_straight_path_it_equals_integrated_gradients():
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    x, baseline = (torch.randn(1, 3, 4, generator=generator, dtype=torch.float64) for _ in range(2))

    def f(z):
        return torch.sin(z.flatten(1) @ w.T).sum(1)

    # integrated gradients by a fine midpoint rule, written out independently of the package
    steps = 4000
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    points = (baseline + alphas.view(-1, 1, 1, 1) * (x - baseline)).requires_grad_(True)
    (grads,) = torch.autograd.grad(f(points).sum(), points)
    reference = grads.mean(0) * (x - baseline)

    on_segments = path_attribution(f, straight_path(x, baseline, segments=6), points=6).values
    torch.testing.assert_close(on_segments, reference, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(integrated_gradients(f, x, baseline, points=24).values, reference, rtol=1e-6, atol=1e-7)


def test_gradient_shap_with_one_baseline_and_no_noise_is_integrated_gradients_in_expectation():
    generator = torch.Generator().manual_seed(5)
    x, baseline = (torch.randn(1, 2, 2, generator=generator, dtype=torch.float64) for _ in range(2))
    w = torch.randn(1, 2, 2, generator=generator, dtype=torch.float64)

    def f(z):  # linear: every interpolation point has the same gradient, so any draw is exact
        return (z * w).sum((1, 2, 3))

    shap = gradient_shap(f, x, baseline[None], samples=5)
    torch.testing.assert_close(shap.values, w * (x - baseline))
    assert abs(shap.completeness_gap) < 1e-10


def test_occlusion_ranks_the_pixels_the_target_reads_first():
    image = torch.ones(1, 32, 32)

    def f(z):  # reads only the top-left quarter
        return z[:, 0, :16, :16].mean((1, 2))

    attribution = occlusion(f, image, mask_size=4)
    spatial = attribution.spatial()
    assert spatial[:12, :12].mean() > 10 * spatial[20:, 20:].abs().mean()
    assert attribution.completeness_gap is None


def test_deletion_and_insertion_match_the_closed_form_on_a_known_case():
    size, region = 8, 10  # the target is the mean of the first `region` pixels in raster order
    image = torch.ones(1, size, size)
    removal = torch.zeros(1, size, size)

    def f(z):
        return z.flatten(1)[:, :region].mean(1)

    saliency = -torch.arange(size * size, dtype=torch.float32).view(size, size)  # perfect ranking
    curves = deletion_insertion(f, image, saliency, removal, steps=8)
    fractions = [i / 8 for i in range(9)]
    removed = [min(round(q * size * size), region) for q in fractions]
    expected_deletion = [1 - r / region for r in removed]
    assert curves.deletion == pytest.approx(expected_deletion)
    assert curves.insertion == pytest.approx([r / region for r in removed])
    auc = sum(
        (fractions[i + 1] - fractions[i]) * (expected_deletion[i + 1] + expected_deletion[i]) / 2 for i in range(8)
    )
    assert curves.deletion_auc == pytest.approx(auc)
    assert curves.insertion_auc == pytest.approx(1 - auc)
    worst = deletion_insertion(f, image, -saliency, removal, steps=8)  # reversed ranking: the region goes last
    assert worst.deletion_auc > curves.deletion_auc
    with pytest.raises(ValueError, match="must match"):
        deletion_insertion(f, image, saliency[:4], removal)


def test_boundary_band_is_dilation_xor_erosion():
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[5:15, 5:15] = True
    band = boundary_band(mask, radius=1)
    assert band[4, 10] and band[5, 10] and band[14, 10] and band[15, 10]
    assert not band[10, 10] and not band[0, 0] and not band[3, 10]
    assert int(band.sum()) == 12 * 12 - 8 * 8


# ------------------------------------------------------------------------------------------------ the flow


def blob_images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Grey discs at random places on a dark background, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(count, 2, generator=generator) * (size - 6) + 3
    radius = 2 + 2 * torch.rand(count, generator=generator)
    distance = ((ys[None] - centres[:, 0, None, None]) ** 2 + (xs[None] - centres[:, 1, None, None]) ** 2).sqrt()
    return (torch.sigmoid(2 * (radius[:, None, None] - distance)) * 1.6 - 0.8)[:, None]


SMALL = FlowConfig(size=16, channels=1, widths=(8, 16), groups=4)


@pytest.fixture(scope="module")
def small_flow():
    return train_flow(blob_images(64), SMALL, steps=150, batch_size=16, seed=0, progress=False)


def test_the_inversion_round_trip_of_a_trained_flow_is_small(small_flow):
    image = blob_images(1, seed=9)[0]
    path = invert(small_flow, image, steps=16)
    assert path.nodes.shape == (17, 1, 16, 16)
    assert torch.equal(path.image, image)
    assert float((path.baseline - image).norm() / image.norm()) > 0.5  # the path goes somewhere
    plain_euler = round_trip_error(small_flow, invert(small_flow, image, steps=16, iterations=0))
    assert round_trip_error(small_flow, path) < min(0.01, plain_euler / 5)
    # the fixed-point nodes follow the field; a straight line to the same baseline does not
    assert field_mismatch(small_flow, path) < 0.02
    assert field_mismatch(small_flow, straight_path(image, path.baseline, 16)) > 5 * field_mismatch(small_flow, path)


def test_flow_saves_and_reloads(tmp_path, small_flow):
    path = save_flow(small_flow, tmp_path / "flow.pt")
    again = load_flow(path)
    x = blob_images(2, seed=3)
    torch.testing.assert_close(again(x, 0.3), small_flow(x, 0.3))
    (tmp_path / "other.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a flow checkpoint"):
        load_flow(tmp_path / "other.pt")


@pytest.mark.parametrize("interrupt_at", [8, 11])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch, interrupt_at):
    images = blob_images(16)
    settings = dict(steps=6, batch_size=4, seed=1, reflow_rounds=1, reflow_pairs=8, reflow_ode_steps=2, progress=False)
    uninterrupted = train_flow(images, SMALL, **settings)

    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == interrupt_at:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    checkpoint = tmp_path / "flow.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", failing_step)
        with pytest.raises(KeyboardInterrupt):
            train_flow(images, SMALL, checkpoint=checkpoint, save_every=3, **settings)
    resumed = train_flow(images, SMALL, checkpoint=checkpoint, save_every=3, **settings)
    for a, b in zip(resumed.state_dict().values(), uninterrupted.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="other settings"):
        train_flow(images, SMALL, checkpoint=checkpoint, **{**settings, "steps": 7})


def test_bad_flow_settings_and_training_images_give_one_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        FlowConfig(size=30, widths=(8, 16, 16), groups=4)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        FlowConfig(channels=2)
    with pytest.raises(ValueError, match="flow was trained on"):
        train_flow(torch.zeros(4, 3, 16, 16), SMALL, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        train_flow(torch.full((4, 1, 16, 16), float("nan")), SMALL, steps=1)


def test_flow_space_is_a_window_around_the_box_pasted_back_into_the_fixed_image():
    from medcore_monai.explain import Region

    region = Region.around(torch.tensor([100.0, 40.0, 140.0, 60.0]), scale=2.0, image_size=256)
    assert (region.side, region.x0, region.y0) == (80, 80, 10)  # 2 x the longer side, centred, inside the image
    assert Region.around(torch.tensor([0.0, 0.0, 10.0, 10.0]), 2.0, 256) == Region(0, 0, 20)  # shifted inside
    assert Region.around(torch.tensor([0.0, 0.0, 10.0, 10.0]), None, 256) == Region(0, 0, 256)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, 256), torch.linspace(0, 1, 256), indexing="ij")
    image = torch.stack([xs, ys, xs * ys])  # smooth, so resizing there and back loses little
    flow_image = region.to_flow(image[None], 40, 3).requires_grad_(True)
    back = region.to_model(flow_image, image)
    window = (..., slice(10, 90), slice(80, 160))
    assert (back[0][window] - image[window]).abs().max() < 0.02
    outside = torch.ones_like(image, dtype=torch.bool)
    outside[window] = False
    assert torch.equal(back[0][outside], image[outside])  # the rest of the input is fixed
    (grad,) = torch.autograd.grad(back.sum(), flow_image)
    assert grad.abs().min() > 0  # every flow pixel reaches the model input
    torch.testing.assert_close(region.box_in_flow(torch.tensor([100.0, 40.0, 140.0, 60.0]), 40),
                               torch.tensor([10.0, 15.0, 30.0, 25.0]))  # fmt: skip
