"""Ignite handlers for the boundary metrics, usable in MONAI bundle configs.

Example bundle snippet::

    key_val_metric:
      val_bf1:
        _target_: medcore_monai.handlers.BoundaryF1
        output_transform: "$monai.handlers.from_engine(['pred', 'label'])"

Spacing comes from the labels' MetaTensor ``pixdim`` (the handler cannot pass keyword arguments to the
metric), so distances are in physical units whenever the loader kept the affine.
"""

from __future__ import annotations

from collections.abc import Callable

from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.utils import MetricReduction

from medcore_monai.metrics.boundary import HD95Mode
from medcore_monai.metrics.cumulative import BoundaryF1Metric, HD95Metric

__all__ = ["HD95", "BoundaryF1"]


def _identity(output: object) -> object:
    return output


class BoundaryF1(IgniteMetricHandler):
    """Mean boundary F1 over images, classes and iterations (see :class:`BoundaryF1Metric`).

    Args:
        include_background: score one-hot channel 0 too (single-channel input is always scored).
        tolerance: matching tolerance, in pixels or in the units of the labels' pixdim.
        reduction: reduction applied to the per-image, per-class scores.
        use_meta_spacing: read spacing from the labels' MetaTensor ``pixdim``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: store per-image scores in ``engine.state.metric_details`` under the metric name.
    """

    def __init__(
        self,
        include_background: bool = False,
        tolerance: float = 2.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        use_meta_spacing: bool = True,
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric_fn = BoundaryF1Metric(
            include_background=include_background,
            tolerance=tolerance,
            reduction=reduction,
            use_meta_spacing=use_meta_spacing,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)


class HD95(IgniteMetricHandler):
    """Mean 95th-percentile Hausdorff distance over images, classes and iterations (see :class:`HD95Metric`).

    Args:
        include_background: score one-hot channel 0 too (single-channel input is always scored).
        mode: ``"surface"`` (MONAI's HD95, the default), ``"region"`` (MedCore pilot variant) or
            ``"contour"`` (inner-contour definition of releases before 0.2); see :func:`compute_hd95`.
        reduction: reduction applied to the per-image, per-class scores.
        use_meta_spacing: read spacing from the labels' MetaTensor ``pixdim``.
        output_transform: maps ``engine.state.output`` to ``(y_pred, y)``, e.g.
            ``monai.handlers.from_engine(["pred", "label"])``.
        save_details: store per-image scores in ``engine.state.metric_details`` under the metric name.
    """

    def __init__(
        self,
        include_background: bool = False,
        mode: HD95Mode = "surface",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        use_meta_spacing: bool = True,
        output_transform: Callable = _identity,
        save_details: bool = True,
    ) -> None:
        metric_fn = HD95Metric(
            include_background=include_background,
            mode=mode,
            reduction=reduction,
            use_meta_spacing=use_meta_spacing,
        )
        super().__init__(metric_fn=metric_fn, output_transform=output_transform, save_details=save_details)
