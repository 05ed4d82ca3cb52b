"""Transport-path attributions (after OTFlowSHAP) of box-prompted segmentation models.

A rectified flow (:mod:`.flow`) carries noise to a dataset's images; inverting an image along it gives a path
from the image's own baseline (:mod:`.path`). The gradient line integral of a segmentation target (:mod:`.targets`)
along that path, per segment with Gauss-Legendre quadrature, is the attribution (:mod:`.attribution`); it is
compared with integrated gradients, GradientSHAP and occlusion by deletion and insertion (:mod:`.faithfulness`),
and a dense and a pruned model explained along the same path give what compression changed (:mod:`.runner`).
"""

from .attribution import Attribution, gauss_legendre, gradient_shap, integrated_gradients, occlusion, path_attribution
from .data import ToFlowSpaced, flow_training_images
from .faithfulness import FaithfulnessCurves, deletion_insertion, removal_image
from .flow import FlowConfig, VelocityField, load_flow, save_flow, train_flow
from .path import TransportPath, field_mismatch, integrate, invert, round_trip_error, straight_path
from .runner import METHODS, ExplainSettings, ImageExplanation, explain_image
from .targets import TARGETS, Region, SegmentationTarget, boundary_band
from .workflow import dense_checkpoint_of, prepare_flow, run_explain, spread_indices

__all__ = [
    "METHODS",
    "TARGETS",
    "Attribution",
    "ExplainSettings",
    "FaithfulnessCurves",
    "FlowConfig",
    "ImageExplanation",
    "Region",
    "SegmentationTarget",
    "ToFlowSpaced",
    "TransportPath",
    "VelocityField",
    "boundary_band",
    "deletion_insertion",
    "dense_checkpoint_of",
    "explain_image",
    "field_mismatch",
    "flow_training_images",
    "gauss_legendre",
    "gradient_shap",
    "integrate",
    "integrated_gradients",
    "invert",
    "load_flow",
    "occlusion",
    "path_attribution",
    "prepare_flow",
    "removal_image",
    "round_trip_error",
    "run_explain",
    "save_flow",
    "spread_indices",
    "straight_path",
    "train_flow",
]
