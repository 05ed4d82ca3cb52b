"""One image explained by every method, and what compression changed along the same transport path."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from .attribution import Attribution, gradient_shap, integrated_gradients, occlusion, path_attribution
from .faithfulness import deletion_insertion, removal_image
from .flow import VelocityField
from .path import TransportPath, field_mismatch, invert, round_trip_error, straight_path
from .targets import Region, SegmentationTarget

__all__ = ["METHODS", "ExplainSettings", "ImageExplanation", "explain_image"]

logger = logging.getLogger(__name__)

METHODS = ("transport", "ig_black", "ig_blur", "gradient_shap", "occlusion")


@dataclasses.dataclass(frozen=True)
class ExplainSettings:
    """How images are explained (the bundle's ``explain.yaml`` keys).

    Args:
        target: one of :data:`medcore_monai.explain.targets.TARGETS`.
        methods: a subset of :data:`METHODS`.
        path_steps: steps of the inversion (segments of the transport path).
        inversion_iterations: fixed-point iterations per inversion step (see :func:`~.path.invert`).
        points: Gauss-Legendre nodes per segment. Integrated gradients and GradientSHAP get the same number of
            gradient evaluations (``path_steps * points``), so the methods cost the same.
        band_radius: half-width of the boundary band (low-resolution logit pixels).
        removal: what deletion and insertion replace pixels with (``blur`` or ``black``).
        extra_removals: more removal images to score with, reported as ``deletion_auc_<mode>`` and
            ``insertion_auc_<mode>`` (each removal image favours the IG baseline it equals, so compare under both).
        blur_sigma: the blur of the removal image and of the blurred IG baseline (flow pixels).
        deletion_steps: points of the deletion and insertion curves.
        occlusion_mask: side of MONAI's occlusion patch (flow pixels).
        shap_noise: GradientSHAP's input noise (flow units, images span [-1, 1]).
        batch_size: images per model call.
        seed: GradientSHAP's draws.
    """

    target: str = "dice_self"
    methods: tuple[str, ...] = METHODS
    path_steps: int = 16
    inversion_iterations: int = 4
    points: int = 4
    band_radius: int = 2
    removal: str = "blur"
    extra_removals: tuple[str, ...] = ()
    blur_sigma: float = 4.0
    deletion_steps: int = 16
    occlusion_mask: int = 8
    shap_noise: float = 0.1
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "extra_removals", tuple(self.extra_removals))
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ConfigError(f"unknown or no explanation methods {unknown}; use some of {', '.join(METHODS)}")
        if self.path_steps < 1 or self.points < 1 or self.deletion_steps < 1:
            raise ConfigError("path_steps, points and deletion_steps must be >= 1")


@dataclasses.dataclass
class ImageExplanation:
    """Per-method attributions and numbers for one image, the path diagnostics and the compression comparison."""

    name: str
    image: torch.Tensor  # flow space
    box: torch.Tensor  # flow pixels
    mask: torch.Tensor
    band: torch.Tensor
    attributions: dict[str, Attribution]
    metrics: dict[str, dict[str, float | None]]
    path: dict[str, float]
    compression: dict[str, Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The JSON-safe part (numbers, no maps)."""
        out = {"name": self.name, "methods": self.metrics, "path": self.path, "notes": self.notes}
        if self.compression is not None:
            out["compression"] = {k: v for k, v in self.compression.items() if not isinstance(v, torch.Tensor)}
        return out


def _method_runners(
    settings: ExplainSettings, target: SegmentationTarget, path: TransportPath, blurred: torch.Tensor
) -> dict[str, Callable[[], Attribution]]:
    image = path.image
    evaluations = settings.path_steps * settings.points
    black = torch.full_like(image, -1.0)
    batch = settings.batch_size
    return {
        "transport": lambda: path_attribution(target, path, settings.points, batch),
        "ig_black": lambda: integrated_gradients(target, image, black, evaluations, batch),
        "ig_blur": lambda: integrated_gradients(target, image, blurred, evaluations, batch),
        "gradient_shap": lambda: gradient_shap(
            target, image, torch.stack([black, blurred]), evaluations, settings.shap_noise, settings.seed, batch
        ),
        "occlusion": lambda: occlusion(target, image, settings.occlusion_mask, 4 * batch),
    }


def _metrics(attribution: Attribution, seconds: float) -> dict[str, float | None]:
    return {
        "target_value": attribution.target_value,
        "baseline_value": attribution.baseline_value,
        "completeness_gap": attribution.completeness_gap,
        "relative_completeness_gap": attribution.relative_completeness_gap,
        "seconds": seconds,
    }


def _check_input(name: str, model_input: torch.Tensor, box: Any) -> None:
    if model_input.ndim != 3 or model_input.shape[0] != 3 or model_input.shape[-1] != model_input.shape[-2]:
        raise DataError(f"{name}: expected the model input [3, M, M], got {tuple(model_input.shape)}")
    if not torch.isfinite(model_input).all():
        raise DataError(f"{name}: the image contains NaN or infinite values")
    if box is None:
        raise DataError(f"{name}: no box prompt; explain needs a box per image (BoxFromMaskd in the preprocessing)")


def explain_image(
    name: str,
    model_input: torch.Tensor,
    box: torch.Tensor | None,
    model: nn.Module,
    flow: VelocityField,
    settings: ExplainSettings,
    label: torch.Tensor | None = None,
    reference: nn.Module | None = None,
) -> ImageExplanation:
    """Explain ``model``'s target for one model input ``[3, M, M]`` in [0, 1] and its ``box`` (model pixels).

    Flow space is the flow's region around the box (``flow.metadata["region_scale"]``; None: the whole image)
    at the flow's size and channels; the rest of the model input stays fixed. With ``reference`` (the dense
    model), the transport attribution is also computed for it along the same path and against the same mask and
    band (the dense model's), giving the difference ``model - reference``.
    """
    _check_input(name, model_input, box)
    if flow.config.channels == 1 and float((model_input - model_input[:1]).abs().max()) > 1e-6:
        raise ConfigError(
            f"{name} is a colour image but the flow is grey (1 channel, trained on {flow.metadata.get('datasets')}); "
            "use a flow trained on these images"
        )
    size = flow.config.size
    region = Region.around(box, flow.metadata.get("region_scale"), model_input.shape[-1])
    image = region.to_flow(model_input[None], size, flow.config.channels)[0]
    flow.check_images(image[None], f"image {name}")
    path = invert(flow, image, settings.path_steps, settings.inversion_iterations)
    target = SegmentationTarget(
        model, box, settings.target, image, region, model_input, label, settings.band_radius, mask_from=reference
    )
    blurred = removal_image(image, "blur", settings.blur_sigma)
    removals = {
        mode: blurred if mode == "blur" else removal_image(image, mode)
        for mode in (settings.removal, *settings.extra_removals)
    }
    runners = _method_runners(settings, target, path, blurred)
    attributions, metrics = {}, {}
    for method in settings.methods:
        start = time.perf_counter()
        attributions[method] = runners[method]()
        seconds = time.perf_counter() - start
        metrics[method] = _metrics(attributions[method], seconds)
        for mode, removal in removals.items():
            curves = deletion_insertion(
                target, image, attributions[method].spatial(), removal, settings.deletion_steps, 2 * settings.batch_size
            )
            suffix = "" if mode == settings.removal else f"_{mode}"
            metrics[method] |= {f"deletion_auc{suffix}": curves.deletion_auc,
                                f"insertion_auc{suffix}": curves.insertion_auc}  # fmt: skip
    diagnostics = {
        "round_trip_error": round_trip_error(flow, path),
        "field_mismatch": field_mismatch(flow, path),
        "straight_line_field_mismatch": field_mismatch(flow, straight_path(image, path.baseline, settings.path_steps)),
    }
    band = region.mask_to_flow(target.band, target.model_size, size)
    mask = region.mask_to_flow(target.own_mask, target.model_size, size)
    notes = []
    if not bool(target.own_mask.any()) and settings.target in ("dice_self", "boundary_energy"):
        notes.append(f"the model's mask is empty at this image: {settings.target} is zero and has no attribution")
        logger.warning("%s: %s", name, notes[-1])
    explanation = ImageExplanation(
        name, image, region.box_in_flow(box, size), mask, band, attributions, metrics, diagnostics, notes=notes
    )
    if reference is not None:
        explanation.compression = _compare(settings, path, target, reference, attributions.get("transport"), band)
    return explanation


def _compare(
    settings: ExplainSettings,
    path: TransportPath,
    target: SegmentationTarget,
    reference: nn.Module,
    model_attribution: Attribution | None,
    band: torch.Tensor,
) -> dict[str, Any]:
    reference_target = SegmentationTarget(
        reference, target.box, settings.target, path.image, target.region, target.context,
        getattr(target, "label", None), settings.band_radius,
    )  # fmt: skip
    dense = path_attribution(reference_target, path, settings.points, settings.batch_size)
    pruned = model_attribution or path_attribution(target, path, settings.points, settings.batch_size)
    difference = pruned.spatial() - dense.spatial()
    total = float(difference.abs().sum())
    return {
        "dense": dense.spatial(),
        "pruned": pruned.spatial(),
        "difference": difference,
        "dense_target_value": dense.target_value,
        "pruned_target_value": pruned.target_value,
        "dense_relative_completeness_gap": dense.relative_completeness_gap,
        "difference_l1": total,
        "difference_band_mass": float(difference.abs()[band].sum()) / max(total, 1e-12),
        "band_area_fraction": float(band.float().mean()),
    }


def summarise(explanations: Sequence[ImageExplanation]) -> dict[str, Any]:
    """Mean and 95 % bootstrap interval over images of each method's AUCs, gaps and times, and of the path.

    Images with a note (an empty mask: the target is zero everywhere) are left out of the means and listed.
    """
    from ..reports.statistics import mean_interval

    used = [e for e in explanations if not e.notes]
    summary: dict[str, Any] = {"images": len(used), "left_out": [e.name for e in explanations if e.notes]}
    for method in used[0].metrics if used else []:
        rows = [e.metrics[method] for e in used]
        summary[method] = {
            key: mean_interval([r[key] for r in rows])
            for key in rows[0]
            if key not in ("target_value", "baseline_value", "completeness_gap")
            and all(r[key] is not None for r in rows)
        }
    if used:
        summary["path"] = {key: mean_interval([e.path[key] for e in used]) for key in used[0].path}
    compared = [e.compression for e in used if e.compression is not None]
    if compared:
        summary["compression"] = {
            key: mean_interval([c[key] for c in compared]) for key in ("difference_band_mass", "band_area_fraction")
        }
    return summary


def as_settings(values: Mapping[str, Any] | ExplainSettings) -> ExplainSettings:
    """Settings from bundle keys (unknown keys raise, so a typo is not ignored)."""
    if isinstance(values, ExplainSettings):
        return values
    known = {f.name for f in dataclasses.fields(ExplainSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown explain settings {unknown}; known: {sorted(known)}")
    return ExplainSettings(**values)
