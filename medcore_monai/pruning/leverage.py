"""Boundary-leverage analysis: why head pruning hurts boundaries more than MLP pruning (MedCore §10).

Principle. To first order, when the decoder's logit field ``z`` changes by ``dz``, its zero level set (the
predicted boundary) moves along its normal by about ``|dz| / |grad z|``. Boundary damage caused by one pruning
step is therefore governed by the logit change *on the boundary* divided by the local spatial logit gradient,
which is why BF1/HD95 can degrade while Dice barely moves.

Measurement, for one step between two pruning configurations (``before`` -> ``after``):

* ``ratios = |z_after - z_before| / max(|grad z_before|, floor)`` on the pixels of a band of half-width
  ``tau`` around the ground-truth boundary, pooled over images; ``|grad z|`` is the Sobel magnitude
  (3x3 kernels / 8) and ``floor`` the 5th percentile of the strictly positive gradient magnitudes of the
  ``before`` configuration (at least ``1e-6``), so flat logit regions do not produce infinite ratios;
* ``lambda95 = P95(ratios) / dC``, ``lambda_mean = mean(ratios) / dC`` and ``lambda_region = mean|dz| / dC``
  over the full images, with ``dC`` the step's change in encoder-parameter reduction (percentage points).

Summary over steps (:func:`blr95`): ``BLR95 = median(head lambda95) / median(MLP lambda95)``, the
region-level ratio ``RLR`` (same with ``lambda_region``), the boundary specificity ``BSR = BLR95 / RLR``,
``WinRate95`` over paired steps, and a bootstrap confidence interval of BLR95.

The caller (the pruning cascade) produces the logits of every configuration; this module only needs, per
step, ``(z_before, z_after, delta_params_pct)`` plus the ground-truth masks at logit resolution. Use
:func:`grid_steps` to enumerate the head and MLP steps of a sparsity grid and the pairs used by WinRate95.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = [
    "MIN_DELTA_PCT",
    "BLRSummary",
    "GridSteps",
    "analyze_leverage",
    "blr95",
    "boundary_band_mask",
    "gradient_floor",
    "grid_steps",
    "leverage_histogram_data",
    "leverage_ratios",
    "log_bin_edges",
    "sobel_gradient_magnitude",
    "step_leverage",
]

ArrayLike = np.ndarray | torch.Tensor
Step = tuple[ArrayLike, ArrayLike, float]
PairSpec = Sequence[tuple[int, int]] | Literal["index"] | None

# Steps whose parameter reduction changes by no more than this (percentage points) are discarded: dividing by
# a near-zero dC would blow the per-percent leverage up (e.g. MLP steps beyond the allocation cap).
MIN_DELTA_PCT = 0.01
_FLOOR_PERCENTILE = 5.0
_MIN_FLOOR = 1e-6
# Guards the BLR/RLR denominators (reference value), so an all-zero MLP family gives a large finite ratio.
_RATIO_EPS = 1e-9

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


# --------------------------------------------------------------------------------------------------
# Per-pixel quantities
# --------------------------------------------------------------------------------------------------


def _as_logit_stack(logits: ArrayLike, name: str) -> torch.Tensor:
    """``[N, 1, H, W]`` floating tensor (at least float32) from ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]``."""
    tensor = torch.as_tensor(logits).detach()
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise ValueError(f"{name} must be [H, W], [N, H, W] or [N, 1, H, W], got shape {tuple(tensor.shape)}")
    # fp16 logits (as cached by the reference) lose too much precision in the Sobel differences.
    if tensor.dtype != torch.float64:
        tensor = tensor.float()
    return tensor


def _as_mask_stack(masks: ArrayLike, name: str = "masks") -> np.ndarray:
    """``[N, H, W]`` boolean array from ``[H, W]``, ``[N, H, W]`` or ``[N, 1, H, W]`` (non-zero = foreground)."""
    array = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if array.ndim == 2:
        array = array[None]
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"{name} must be [H, W], [N, H, W] or [N, 1, H, W], got shape {array.shape}")
    return array != 0


def sobel_gradient_magnitude(logits: ArrayLike) -> torch.Tensor:
    """Per-pixel spatial gradient magnitude of logit maps.

    Uses the standard 3x3 Sobel kernels divided by 8, so a linear ramp of slope ``s`` has magnitude ``s``
    away from the border; the border is handled with replicate padding.

    Args:
        logits: Logits as ``[N, 1, H, W]``, ``[N, H, W]`` or ``[H, W]`` (tensor or numpy array).

    Returns:
        ``|grad z|`` with the same shape as ``logits`` (float32, or float64 for float64 input).
    """
    stack = _as_logit_stack(logits, "logits")
    kernel_x = _SOBEL_X.to(device=stack.device, dtype=stack.dtype)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]
    padded = F.pad(stack, (1, 1, 1, 1), mode="replicate")
    grads = F.conv2d(padded, kernels)
    magnitude = torch.sqrt(grads[:, :1] ** 2 + grads[:, 1:] ** 2)
    return magnitude.reshape(torch.as_tensor(logits).shape)


def _distance_to_other_class(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest pixel of the other class (inf if there is none)."""
    if mask.all() or not mask.any():
        return np.full(mask.shape, np.inf)
    # EDT(mask) is the distance to background on foreground pixels (0 elsewhere) and EDT(~mask) the distance
    # to foreground on background pixels, so their sum is the distance to the other class everywhere.
    # (The literal "min" of the two, as §10 words it, would be 0 on every pixel.)
    return ndimage.distance_transform_edt(mask) + ndimage.distance_transform_edt(~mask)


def boundary_band_mask(masks: ArrayLike, tau: float) -> np.ndarray:
    """Pixels whose distance to the other class is at most ``tau``, per image.

    Pixels adjacent to the other class are at distance 1, so the band is about ``2 * tau`` pixels wide,
    ``tau`` on each side of the boundary. An image without foreground (or without background) has no band.

    Args:
        masks: Binary ground truth as ``[N, 1, H, W]``, ``[N, H, W]`` or ``[H, W]``.
        tau: Band half-width in pixels (the reference uses 3 and 5 at 256x256).

    Returns:
        Boolean array ``[N, H, W]``.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    stack = _as_mask_stack(masks)
    return np.stack([_distance_to_other_class(mask) <= tau for mask in stack])


def gradient_floor(grad_magnitude: ArrayLike, percentile: float = _FLOOR_PERCENTILE) -> float:
    """Lower bound for the leverage denominator.

    Args:
        grad_magnitude: ``|grad z|`` of every image of one configuration (any shape; pooled).
        percentile: Percentile of the strictly positive magnitudes.

    Returns:
        ``max(P_percentile(|grad z| > 0), 1e-6)``; ``1e-6`` when no magnitude is positive.
    """
    values = torch.as_tensor(grad_magnitude).detach().reshape(-1).double()
    positive = values[values > 0]
    if positive.numel() == 0:
        return _MIN_FLOOR
    return max(float(np.percentile(positive.cpu().numpy(), percentile)), _MIN_FLOOR)


def _check_same_shape(z_before: torch.Tensor, z_after: torch.Tensor, band: np.ndarray) -> None:
    if z_before.shape != z_after.shape:
        raise ValueError(f"z_before {tuple(z_before.shape)} and z_after {tuple(z_after.shape)} differ in shape")
    expected = (z_before.shape[0], *z_before.shape[2:])
    if band.shape != expected:
        raise ValueError(f"masks/band have shape {band.shape}, expected {expected} (resize GT to the logit grid)")


def _resolve_band(gt_masks: ArrayLike | None, tau: float, band: ArrayLike | None) -> np.ndarray:
    if band is not None:
        return _as_mask_stack(band, "band")
    if gt_masks is None:
        raise ValueError("pass gt_masks or a precomputed band")
    return boundary_band_mask(gt_masks, tau)


def _step_fields(
    z_before: ArrayLike, z_after: ArrayLike, gt_masks: ArrayLike | None, tau: float, band: ArrayLike | None
) -> tuple[np.ndarray, float]:
    """Band ratios (pooled, image-major) and mean ``|dz|`` over every pixel of every image."""
    before = _as_logit_stack(z_before, "z_before")
    after = _as_logit_stack(z_after, "z_after").to(device=before.device, dtype=before.dtype)
    band_mask = _resolve_band(gt_masks, tau, band)
    _check_same_shape(before, after, band_mask)
    grad = sobel_gradient_magnitude(before)[:, 0]
    abs_dz = (after - before)[:, 0].abs()
    ratio = abs_dz / grad.clamp_min(gradient_floor(grad))
    return ratio.double().cpu().numpy()[band_mask], float(abs_dz.double().mean())


def leverage_ratios(
    z_before: ArrayLike,
    z_after: ArrayLike,
    gt_masks: ArrayLike | None,
    tau: float = 3.0,
    *,
    band: ArrayLike | None = None,
) -> np.ndarray:
    """Per-pixel boundary leverage ``|dz| / max(|grad z_before|, floor)`` on the GT boundary band.

    Args:
        z_before: Logits of the configuration before the step, ``[N, (1,) H, W]``.
        z_after: Logits after the step, same shape.
        gt_masks: Ground truth at logit resolution, ``[N, (1,) H, W]``; may be ``None`` when ``band`` is given.
        tau: Band half-width in pixels.
        band: Precomputed :func:`boundary_band_mask` (reuse it across steps; the EDT dominates the cost).

    Returns:
        1-D float64 array of the ratios of all band pixels, pooled over images (image-major order). The floor
        is :func:`gradient_floor` of the ``before`` gradients, pooled over all pixels of all images.
    """
    ratios, _ = _step_fields(z_before, z_after, gt_masks, tau, band)
    return ratios


# --------------------------------------------------------------------------------------------------
# Per-step leverage
# --------------------------------------------------------------------------------------------------


def step_leverage(
    z_before: ArrayLike,
    z_after: ArrayLike,
    gt: ArrayLike | None,
    delta_params_pct: float,
    tau: float = 3.0,
    *,
    band: ArrayLike | None = None,
) -> dict[str, float] | None:
    """Boundary and region leverage of one pruning step, per percentage point of parameters removed.

    Args:
        z_before: Logits before the step, ``[N, (1,) H, W]``.
        z_after: Logits after the step, same shape.
        gt: Ground-truth masks at logit resolution (``None`` allowed when ``band`` is given).
        delta_params_pct: ``dC``, the increase in encoder-parameter reduction of the step, in percentage points.
        tau: Band half-width in pixels.
        band: Precomputed :func:`boundary_band_mask`, to reuse across steps.

    Returns:
        ``None`` when ``dC <= MIN_DELTA_PCT`` (the step is discarded, as in the reference; returning ``None``
        keeps index pairing intact, and :func:`blr95` skips such steps). Otherwise a dict with ``lambda95``,
        ``lambda_mean``, ``lambda_region``, the unnormalised ``p95_ratio``, ``mean_ratio``, ``mean_abs_dz``,
        ``delta_params_pct``, ``tau`` and ``n_band_pixels``.

    Raises:
        ValueError: If the ground truth has no boundary pixel (every image empty or full).
    """
    delta = float(delta_params_pct)
    if not delta > MIN_DELTA_PCT:
        return None
    ratios, mean_abs_dz = _step_fields(z_before, z_after, gt, tau, band)
    if ratios.size == 0:
        raise ValueError("no boundary-band pixel in the ground truth: leverage is undefined")
    p95 = float(np.percentile(ratios, 95.0))
    mean_ratio = float(ratios.mean())
    return {
        "lambda95": p95 / delta,
        "lambda_mean": mean_ratio / delta,
        "lambda_region": mean_abs_dz / delta,
        "p95_ratio": p95,
        "mean_ratio": mean_ratio,
        "mean_abs_dz": mean_abs_dz,
        "delta_params_pct": delta,
        "tau": float(tau),
        "n_band_pixels": float(ratios.size),
    }


# --------------------------------------------------------------------------------------------------
# Summary over steps
# --------------------------------------------------------------------------------------------------


@dataclass
class BLRSummary:
    """Head-vs-MLP boundary-leverage summary (see :func:`blr95`)."""

    blr95: float
    rlr: float
    bsr: float
    ci_low: float
    ci_high: float
    ci_level: float
    n_bootstrap: int
    seed: int
    n_head_steps: int
    n_mlp_steps: int
    head_lambda95_median: float
    mlp_lambda95_median: float
    head_lambda_region_median: float
    mlp_lambda_region_median: float
    n_pairs: int = 0
    win_rate95: float | None = None
    diff_median95: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dictionary (plain floats, ints and ``None``)."""
        return asdict(self)


def _valid_steps(steps: Sequence[Mapping[str, float] | None]) -> list[Mapping[str, float]]:
    return [step for step in steps if step is not None]


def _column(steps: Sequence[Mapping[str, float]], key: str) -> np.ndarray:
    return np.array([float(step[key]) for step in steps], dtype=np.float64)


def _median_ratio(numerator: np.ndarray, denominator: np.ndarray) -> float:
    return float(np.median(numerator) / (np.median(denominator) + _RATIO_EPS))


def _resolve_pairs(pairs: PairSpec, n_head: int, n_mlp: int) -> list[tuple[int, int]]:
    if pairs is None:
        return []
    if isinstance(pairs, str):
        if pairs != "index":
            raise ValueError(f"pairs must be 'index', a list of (head, mlp) indices or None, got {pairs!r}")
        if n_head != n_mlp:
            raise ValueError(f"pairs='index' needs as many head steps as MLP steps ({n_head} vs {n_mlp})")
        return [(i, i) for i in range(n_head)]
    resolved = [(int(h), int(m)) for h, m in pairs]
    for h, m in resolved:
        if not (0 <= h < n_head and 0 <= m < n_mlp):
            raise IndexError(f"pair ({h}, {m}) out of range for {n_head} head and {n_mlp} MLP steps")
    return resolved


def _paired_lambda95(
    head_steps: Sequence[Mapping[str, float] | None],
    mlp_steps: Sequence[Mapping[str, float] | None],
    pairs: list[tuple[int, int]],
) -> tuple[np.ndarray, np.ndarray]:
    """lambda95 of both members of every pair where neither step was discarded."""
    kept = [(head_steps[h], mlp_steps[m]) for h, m in pairs if head_steps[h] is not None and mlp_steps[m] is not None]
    head = np.array([float(h["lambda95"]) for h, _ in kept], dtype=np.float64)
    mlp = np.array([float(m["lambda95"]) for _, m in kept], dtype=np.float64)
    return head, mlp


def _bootstrap_ci(
    head: np.ndarray, mlp: np.ndarray, n_bootstrap: int, rng: np.random.Generator, ci: float
) -> tuple[float, float]:
    """Percentile interval of median(head)/median(mlp), resampling each family's steps with replacement."""
    head_idx = rng.integers(0, head.size, size=(n_bootstrap, head.size))
    mlp_idx = rng.integers(0, mlp.size, size=(n_bootstrap, mlp.size))
    ratios = np.median(head[head_idx], axis=1) / (np.median(mlp[mlp_idx], axis=1) + _RATIO_EPS)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)


def blr95(
    head_steps: Sequence[Mapping[str, float] | None],
    mlp_steps: Sequence[Mapping[str, float] | None],
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    pairs: PairSpec = None,
) -> BLRSummary:
    """Boundary-leverage ratio of head-pruning steps to MLP-pruning steps.

    Args:
        head_steps: :func:`step_leverage` results of the head steps (``None`` entries = discarded steps).
        mlp_steps: Same for the MLP steps.
        n_bootstrap: Bootstrap resamples for the confidence interval of BLR95.
        seed: Seed of the ``numpy.random.Generator`` used by the bootstrap (results are reproducible).
        ci: Confidence level of the percentile interval.
        pairs: Which head step is paired with which MLP step for WinRate95 and the median paired difference:
            ``"index"`` (``head_steps[i]`` with ``mlp_steps[i]``), an explicit list of ``(head_index,
            mlp_index)`` (e.g. :attr:`GridSteps.pairs`), or ``None`` for no paired statistics. Pairs with a
            discarded member are skipped. Pairing is explicit because equal list lengths do not imply
            pairing: on a square grid both families have the same number of steps in different orders.

    Returns:
        :class:`BLRSummary` with BLR95, RLR, BSR, the bootstrap interval of BLR95 and, for paired steps,
        WinRate95 (fraction of pairs whose head lambda95 is strictly larger) and the median paired difference.

    Raises:
        ValueError: If a family has no valid step, or ``n_bootstrap``/``ci`` are out of range.
    """
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    head, mlp = _valid_steps(head_steps), _valid_steps(mlp_steps)
    if not head or not mlp:
        raise ValueError(f"need at least one valid head and MLP step (got {len(head)} and {len(mlp)})")
    head95, mlp95 = _column(head, "lambda95"), _column(mlp, "lambda95")
    head_region, mlp_region = _column(head, "lambda_region"), _column(mlp, "lambda_region")
    blr = _median_ratio(head95, mlp95)
    rlr = _median_ratio(head_region, mlp_region)
    ci_low, ci_high = _bootstrap_ci(head95, mlp95, n_bootstrap, np.random.default_rng(seed), ci)
    paired_head, paired_mlp = _paired_lambda95(
        head_steps, mlp_steps, _resolve_pairs(pairs, len(head_steps), len(mlp_steps))
    )
    has_pairs = paired_head.size > 0
    return BLRSummary(
        blr95=blr,
        rlr=rlr,
        bsr=blr / (rlr + _RATIO_EPS),
        ci_low=ci_low,
        ci_high=ci_high,
        ci_level=float(ci),
        n_bootstrap=int(n_bootstrap),
        seed=int(seed),
        n_head_steps=len(head),
        n_mlp_steps=len(mlp),
        head_lambda95_median=float(np.median(head95)),
        mlp_lambda95_median=float(np.median(mlp95)),
        head_lambda_region_median=float(np.median(head_region)),
        mlp_lambda_region_median=float(np.median(mlp_region)),
        n_pairs=int(paired_head.size),
        win_rate95=float(np.mean(paired_head > paired_mlp)) if has_pairs else None,
        diff_median95=float(np.median(paired_head - paired_mlp)) if has_pairs else None,
    )


# --------------------------------------------------------------------------------------------------
# Grid helpers and end-to-end analysis
# --------------------------------------------------------------------------------------------------


@dataclass
class GridSteps:
    """Adjacent steps of a (head level x MLP level) sparsity grid; configurations are ``(i, j)`` indices."""

    head: list[tuple[tuple[int, int], tuple[int, int]]]
    mlp: list[tuple[tuple[int, int], tuple[int, int]]]
    pairs: list[tuple[int, int]]


def grid_steps(n_head_levels: int, n_mlp_levels: int) -> GridSteps:
    """Head steps ``(i, j) -> (i + 1, j)``, MLP steps ``(i, j) -> (i, j + 1)`` and their pairing.

    A head step and an MLP step are paired when they leave the same grid point, as in the reference
    WinRate95. ``pairs`` holds ``(index into head, index into mlp)``, ready for :func:`blr95`.

    Args:
        n_head_levels: Number of head-sparsity levels (rows, index ``i``).
        n_mlp_levels: Number of MLP-sparsity levels (columns, index ``j``).

    Returns:
        :class:`GridSteps`.
    """
    head = [((i, j), (i + 1, j)) for i in range(n_head_levels - 1) for j in range(n_mlp_levels)]
    mlp = [((i, j), (i, j + 1)) for i in range(n_head_levels) for j in range(n_mlp_levels - 1)]
    mlp_index = {start: k for k, (start, _) in enumerate(mlp)}
    pairs = [(k, mlp_index[start]) for k, (start, _) in enumerate(head) if start in mlp_index]
    return GridSteps(head=head, mlp=mlp, pairs=pairs)


def analyze_leverage(
    head_steps: Sequence[Step],
    mlp_steps: Sequence[Step],
    gt_masks: ArrayLike,
    tau: float = 3.0,
    *,
    pairs: PairSpec = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    keep_ratios: bool = False,
) -> dict[str, Any]:
    """Full head-vs-MLP leverage analysis from the logits of every step.

    Args:
        head_steps: ``(z_before, z_after, delta_params_pct)`` for every head-pruning step.
        mlp_steps: Same for every MLP-pruning step.
        gt_masks: Ground truth of the images, at logit resolution (shared by all steps).
        tau: Band half-width in pixels.
        pairs: Pairing for WinRate95 (see :func:`blr95`).
        n_bootstrap: Bootstrap resamples.
        seed: Bootstrap seed.
        ci: Confidence level.
        keep_ratios: Also return the pooled per-pixel ratios of each family (for
            :func:`leverage_histogram_data` or ``plot_leverage_histogram``); can be large.

    Returns:
        ``{"tau", "summary": BLRSummary.to_dict(), "head_steps": [...], "mlp_steps": [...]}`` with the
        per-step dicts (``None`` for discarded steps) and, with ``keep_ratios``, ``"head_ratios"`` and
        ``"mlp_ratios"`` (numpy arrays, discarded steps excluded).
    """
    band = boundary_band_mask(gt_masks, tau)

    def measure(steps: Sequence[Step]) -> tuple[list[dict[str, float] | None], list[np.ndarray]]:
        results, ratios = [], []
        for z_before, z_after, delta in steps:
            result = step_leverage(z_before, z_after, None, delta, tau, band=band)
            results.append(result)
            if keep_ratios and result is not None:
                ratios.append(leverage_ratios(z_before, z_after, None, tau, band=band))
        return results, ratios

    head_results, head_ratios = measure(head_steps)
    mlp_results, mlp_ratios = measure(mlp_steps)
    summary = blr95(head_results, mlp_results, n_bootstrap=n_bootstrap, seed=seed, ci=ci, pairs=pairs)
    out: dict[str, Any] = {
        "tau": float(tau),
        "summary": summary.to_dict(),
        "head_steps": head_results,
        "mlp_steps": mlp_results,
    }
    if keep_ratios:
        out["head_ratios"] = np.concatenate(head_ratios) if head_ratios else np.empty(0)
        out["mlp_ratios"] = np.concatenate(mlp_ratios) if mlp_ratios else np.empty(0)
    return out


def leverage_histogram_data(
    head_ratios: ArrayLike, mlp_ratios: ArrayLike, n_bins: int = 60
) -> dict[str, np.ndarray | float]:
    """Per-bin fractions of both ratio families on shared log-spaced bins (for a log-x histogram).

    Fractions rather than densities per unit ratio: on a log axis a density per unit x would make the wide
    (high) bins look empty. Zero ratios cannot be placed on a log axis; they are left out of the fractions
    and reported as ``head_zero_fraction`` / ``mlp_zero_fraction``.

    Args:
        head_ratios: Pooled per-pixel ratios of the head steps.
        mlp_ratios: Pooled per-pixel ratios of the MLP steps.
        n_bins: Number of bins.

    Returns:
        Dict with ``edges`` (``n_bins + 1``), ``head_fraction`` and ``mlp_fraction`` (each summing to 1 over
        the positive finite ratios, or all zeros when a family has none) and the two zero fractions.
    """
    head = np.asarray(head_ratios, dtype=np.float64).ravel()
    mlp = np.asarray(mlp_ratios, dtype=np.float64).ravel()
    edges = log_bin_edges(np.concatenate([head, mlp]), n_bins)
    return {
        "edges": edges,
        "head_fraction": _bin_fractions(head, edges),
        "mlp_fraction": _bin_fractions(mlp, edges),
        "head_zero_fraction": float(np.mean(head <= 0)) if head.size else 0.0,
        "mlp_zero_fraction": float(np.mean(mlp <= 0)) if mlp.size else 0.0,
    }


def log_bin_edges(values: ArrayLike, n_bins: int) -> np.ndarray:
    """``n_bins + 1`` log-spaced edges covering the positive finite values (``[1e-3, 1]`` when there are none)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    positive = values[(values > 0) & np.isfinite(values)]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-3, 1.0)
    if high <= low:
        low, high = low / 10.0, high * 10.0
    return np.logspace(np.log10(low), np.log10(high), n_bins + 1)


def _bin_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    shown = values[(values > 0) & np.isfinite(values)]
    if shown.size == 0:
        return np.zeros(edges.size - 1)
    counts, _ = np.histogram(shown, bins=edges)
    return counts / shown.size
