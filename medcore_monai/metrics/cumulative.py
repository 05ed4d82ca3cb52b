"""MONAI ``CumulativeIterationMetric`` wrappers around the functional boundary metrics.

The classes accept what MONAI metrics accept: a batch-first tensor ``[B, C, H, W(, D)]`` or a list of
channel-first tensors ``[C, H, W(, D)]``. Inputs must be binary and either

* single-channel (``C == 1``): that channel is the foreground and is always scored, or
* one-hot (``C >= 2``): channel 0 is background and is dropped unless ``include_background``.

Each call appends a ``[B, C']`` tensor of per-image, per-class scores to the buffer; ``aggregate``
reduces it with :func:`monai.metrics.utils.do_metric_reduction`. Values come from
:mod:`medcore_monai.metrics.boundary`, so the empty-mask policy there applies (no NaNs are produced).

Physical spacing reaches the metric either as ``metric(y_pred, y, spacing=...)`` or, when that is
omitted, from ``y.pixdim`` if ``y`` is a :class:`monai.data.MetaTensor`. The second route matters inside
Ignite: :class:`monai.handlers.IgniteMetricHandler` calls ``metric_fn(y_pred, y)`` without keyword
arguments, but the decollated labels are MetaTensors that still carry their affine.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from medcore_monai.metrics.boundary import (
    HD95_MODES,
    HD95Mode,
    SpacingLike,
    compute_boundary_f1,
    compute_hd95,
)

__all__ = ["BoundaryF1Metric", "HD95Metric"]

_SPATIAL_DIMS_BY_TENSOR_DIMS = {4: 2, 5: 3}


def _plain_numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """Numpy view of a tensor, dropping MetaTensor wrapping and autograd."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().as_subclass(torch.Tensor).numpy()
    return np.asarray(values)


def _flat_spacing_per_item(values: Sequence, batch_size: int, spatial_dims: int) -> list[SpacingLike]:
    """Interpret a flat list of numbers as per-axis spacing or as one isotropic spacing per image.

    A length equal to the number of spatial axes is read as per-axis, as MONAI does, even when it also
    equals the batch size.
    """
    if len(values) == spatial_dims:
        return [tuple(float(v) for v in values)] * batch_size
    if len(values) == batch_size:
        return [float(v) for v in values]
    raise ValueError(
        f"a flat spacing sequence needs {spatial_dims} entries (per axis) or {batch_size} (per image), "
        f"got {len(values)}"
    )


def _spacing_per_item(spacing: object, batch_size: int, spatial_dims: int) -> list[SpacingLike]:
    """Expand a call-time ``spacing`` argument to one entry per batch item.

    Args:
        spacing: ``None``; one number (isotropic, all images); one number per spatial axis (all images);
            one number per image (isotropic); or a length-``batch_size`` sequence of per-axis spacings
            (a list of sequences, or a ``[B, spatial_dims]`` array/tensor).
        batch_size: number of images in the batch.
        spatial_dims: number of spatial axes (2 or 3).

    Returns:
        A list of ``batch_size`` spacings accepted by the functional metrics.

    Raises:
        ValueError: if the lengths are inconsistent with the batch or the image dimensionality.
    """
    if spacing is None:
        return [None] * batch_size
    if isinstance(spacing, (torch.Tensor, np.ndarray)):
        spacing = _plain_numpy(spacing).astype(np.float64)
        if spacing.ndim == 0:
            return [float(spacing)] * batch_size
        if spacing.ndim == 1:
            return _flat_spacing_per_item(list(spacing), batch_size, spatial_dims)
        spacing = list(spacing)
    if not isinstance(spacing, Sequence) or isinstance(spacing, str):
        return [float(spacing)] * batch_size  # type: ignore[arg-type]
    if all(np.ndim(item) == 0 for item in spacing):
        return _flat_spacing_per_item(spacing, batch_size, spatial_dims)
    if len(spacing) != batch_size:
        raise ValueError(f"a per-image spacing list needs {batch_size} entries, got {len(spacing)}")
    return list(spacing)


def _meta_spacing_per_item(y: MetaTensor, batch_size: int, spatial_dims: int) -> list[SpacingLike]:
    """Per-image spacing read from a MetaTensor's ``pixdim``.

    A batched MetaTensor reports one pixdim per image; an unbatched one (e.g. a single decollated item
    that MONAI unsqueezed into a batch of one) reports one pixdim shared by all images. Only the first
    ``spatial_dims`` entries are used, because MONAI keeps 4x4 affines even for 2D images.

    Args:
        y: ground-truth MetaTensor, batch-first.
        batch_size: number of images in the batch.
        spatial_dims: number of spatial axes (2 or 3).

    Returns:
        A list of ``batch_size`` spacings; all ``None`` (pixels) when the metadata cannot be matched to the
        batch, with a warning.
    """
    pixdim = y.pixdim
    per_item = list(pixdim) if isinstance(pixdim, list) else [pixdim] * batch_size
    spacings = [_plain_numpy(item).astype(np.float64).ravel()[:spatial_dims] for item in per_item]
    if len(spacings) != batch_size or any(s.size != spatial_dims for s in spacings):
        warnings.warn("could not match MetaTensor pixdim to the batch; computing distances in pixels", stacklevel=3)
        return [None] * batch_size
    return [tuple(float(v) for v in s) for s in spacings]


class _PerClassMaskMetric(CumulativeIterationMetric, ABC):
    """Shared plumbing: input checks, channel selection, spacing lookup, buffering and reduction."""

    def __init__(
        self,
        include_background: bool,
        reduction: MetricReduction | str,
        get_not_nans: bool,
        use_meta_spacing: bool,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.reduction = reduction
        self.get_not_nans = get_not_nans
        self.use_meta_spacing = use_meta_spacing

    @abstractmethod
    def _score(self, pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike) -> float:
        """Metric value for one image and one class."""

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, spacing: object = None
    ) -> torch.Tensor:
        """Score every image and class of a batch.

        Args:
            y_pred: binary prediction ``[B, C, H, W(, D)]``, single-channel or one-hot.
            y: binary ground truth with the same shape and encoding.
            spacing: optional physical spacing: one number, one number per spatial axis, one number
                per image, or one per-axis sequence per image. When omitted and ``use_meta_spacing``
                is set, it is read from ``y.pixdim`` if ``y`` is a MetaTensor; otherwise pixels.

        Returns:
            Float tensor ``[B, C']`` on the device of ``y_pred``.

        Raises:
            ValueError: on a missing ``y``, mismatched shapes or an unsupported number of dimensions.
        """
        if y is None:
            raise ValueError(f"{type(self).__name__} needs a ground truth `y`")
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred and y must have the same shape, got {tuple(y_pred.shape)} and {tuple(y.shape)}")
        spatial_dims = _SPATIAL_DIMS_BY_TENSOR_DIMS.get(y_pred.ndim)
        if spatial_dims is None:
            raise ValueError(f"expected [B, C, H, W] or [B, C, H, W, D] input, got shape {tuple(y_pred.shape)}")
        batch_size = y_pred.shape[0]
        spacings = self._resolve_spacing(y, spacing, batch_size, spatial_dims)
        preds, gts = self._scored_channels(_plain_numpy(y_pred)), self._scored_channels(_plain_numpy(y))
        scores = np.empty(preds.shape[:2], dtype=np.float64)
        for b, c in np.ndindex(*scores.shape):
            scores[b, c] = self._score(preds[b, c], gts[b, c], spacings[b])
        return torch.as_tensor(scores, dtype=torch.float32, device=y_pred.device)

    def _resolve_spacing(
        self, y: torch.Tensor, spacing: object, batch_size: int, spatial_dims: int
    ) -> list[SpacingLike]:
        """Call-time spacing wins; otherwise MetaTensor pixdim (if enabled); otherwise pixels."""
        if spacing is not None:
            return _spacing_per_item(spacing, batch_size, spatial_dims)
        if self.use_meta_spacing and isinstance(y, MetaTensor):
            return _meta_spacing_per_item(y, batch_size, spatial_dims)
        return [None] * batch_size

    def _scored_channels(self, batch: np.ndarray) -> np.ndarray:
        """Drop the one-hot background channel unless asked to keep it; a lone channel is foreground."""
        if batch.shape[1] == 1 or self.include_background:
            return batch
        return batch[:, 1:]

    def aggregate(
        self, reduction: MetricReduction | str | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Reduce the buffered ``[N, C']`` scores.

        Args:
            reduction: overrides the constructor's reduction for this call; one of ``"none"``, ``"mean"``,
                ``"sum"``, ``"mean_batch"``, ``"sum_batch"``, ``"mean_channel"``, ``"sum_channel"``.

        Returns:
            The reduced value, or ``(value, not_nans)`` when ``get_not_nans`` is set.

        Raises:
            ValueError: if the buffer does not hold a tensor (nothing was computed yet).
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"{type(self).__name__} has no buffered scores to aggregate")
        # do_metric_reduction zeroes NaNs in place; clone so the buffer itself is never altered.
        value, not_nans = do_metric_reduction(data.clone(), reduction or self.reduction)
        return (value, not_nans) if self.get_not_nans else value


class BoundaryF1Metric(_PerClassMaskMetric):
    """Boundary F1 (BF score) per image and class; see :func:`compute_boundary_f1`.

    Args:
        include_background: score one-hot channel 0 too (ignored for single-channel input, whose only
            channel is always scored).
        tolerance: matching tolerance, in pixels or in physical units when a spacing is available.
        reduction: default reduction used by :meth:`aggregate`.
        get_not_nans: make :meth:`aggregate` return ``(value, not_nans)``.
        use_meta_spacing: read spacing from ``y.pixdim`` when ``y`` is a MetaTensor and no ``spacing`` is
            passed at call time.

    Example:
        >>> metric = BoundaryF1Metric(tolerance=2.0)
        >>> metric(y_pred, y, spacing=(0.8, 0.8))  # doctest: +SKIP
        >>> metric.aggregate()  # doctest: +SKIP
    """

    def __init__(
        self,
        include_background: bool = False,
        tolerance: float = 2.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        use_meta_spacing: bool = True,
    ) -> None:
        super().__init__(include_background, reduction, get_not_nans, use_meta_spacing)
        self.tolerance = tolerance

    def _score(self, pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike) -> float:
        return compute_boundary_f1(pred, gt, tolerance=self.tolerance, spacing=spacing)


class HD95Metric(_PerClassMaskMetric):
    """95th-percentile Hausdorff distance per image and class; see :func:`compute_hd95`.

    Args:
        include_background: score one-hot channel 0 too (ignored for single-channel input, whose only
            channel is always scored).
        mode: ``"surface"`` (MONAI's HD95, equal to ``HausdorffDistanceMetric(percentile=95)`` but with
            the empty-mask policy of :mod:`medcore_monai.metrics.boundary` instead of NaN), ``"region"``
            (MedCore pilot variant) or ``"contour"`` (inner-contour definition of releases before 0.2).
        reduction: default reduction used by :meth:`aggregate`.
        get_not_nans: make :meth:`aggregate` return ``(value, not_nans)``.
        use_meta_spacing: read spacing from ``y.pixdim`` when ``y`` is a MetaTensor and no ``spacing`` is
            passed at call time.
    """

    def __init__(
        self,
        include_background: bool = False,
        mode: HD95Mode = "surface",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
        use_meta_spacing: bool = True,
    ) -> None:
        # Checked here too so that a bad bundle config fails when it is parsed, not at the first batch.
        if mode not in HD95_MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, HD95_MODES))}, got {mode!r}")
        super().__init__(include_background, reduction, get_not_nans, use_meta_spacing)
        self.mode = mode

    def _score(self, pred: np.ndarray, gt: np.ndarray, spacing: SpacingLike) -> float:
        return compute_hd95(pred, gt, spacing=spacing, mode=self.mode)
