"""The MedCore cascade's decisions: what to calibrate, how to score, which heads and channels to remove.

Scores come from per-dataset boundary-aware Fisher of the current model and (for ``dual``/``reset``) the Fisher
of the general SAM reference; budgets are split over blocks by sensitivity; each step slims the model physically
(default) or masks it. :class:`CascadeState` holds one cascade's state; the Ignite side (recovery training
between the steps, stage evaluation, reports) is :class:`medcore_monai.handlers.PruningHandler` on a
:class:`medcore_monai.engines.recovery.RecoveryTrainer`, and :func:`medcore_monai.cascade.run_cascade` runs both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..losses.recovery import RecoveryLossWeights
from ..networks.conv_groups import conv_blocks, conv_kept_indices, conv_structure
from ..networks.structure import (
    StructuredMasks,
    attach_masks,
    encoder_structure,
    head_qkv_rows,
    kept_indices,
    prunable_blocks,
    slim_encoder_,
)
from .budget import BudgetReport, block_sensitivity, plan_masks
from .fisher import FisherCalibration, FisherResult, cross_fisher
from .scores import (
    SCORE_METHODS,
    GroupScores,
    aggregate_datasets,
    alpha_per_block,
    magnitude_scores,
    mix_scores,
    normalised_weights,
    random_scores,
    reset_scores,
    zero_scores,
)

__all__ = [
    "CascadeConfig",
    "CascadeResult",
    "CascadeState",
    "LR_SCHEDULES",
    "RecoveryConfig",
    "aligned_reference",
    "score_groups",
    "score_model",
    "score_model_methods",
]

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")  # recovery learning rate within each stage (handlers.StageLrSchedule)


@dataclass(frozen=True)
class RecoveryConfig:
    """Recovery hyper-parameters (MedCore defaults: 100 steps, AdamW lr 1e-5, no weight decay, batch 1).

    ``lr_schedule`` shapes the learning rate within each stage: ``constant`` (MedCore), or ``cosine`` (a 5 %
    warm-up to ``lr``, then half a cosine down to zero).
    """

    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 1
    seed: int = 0
    amp: bool = False
    loss: RecoveryLossWeights = field(default_factory=RecoveryLossWeights)
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"invalid recovery config: steps {self.steps}, batch {self.batch_size}, lr {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


@dataclass(frozen=True)
class CascadeConfig:
    """Everything that decides what the cascade removes and how it recovers."""

    head_sparsity: float = 0.5
    mlp_sparsity: float = 0.7
    mbconv_sparsity: float = 0.0
    score: str = "dual"
    protected_blocks: tuple[int, ...] = ()
    min_keep_heads: int = 1
    min_keep_mlp_fraction: float = 0.05
    boundary_fisher_weight: float = 3.0
    fisher_reduction: str = "mean"
    dist_beta: float = 0.3
    spread: str = "std"
    pi: tuple[float, ...] | None = None
    recompute_mlp_scores: bool = False
    continuation: bool = False
    slim: bool = True
    reestimate_batchnorm: bool = False
    teacher_cache: bool = True
    seed: int = 0
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)

    def __post_init__(self) -> None:
        if self.score not in SCORE_METHODS:
            raise ValueError(f"score must be one of {SCORE_METHODS}, got {self.score!r}")
        for name in ("head_sparsity", "mlp_sparsity", "mbconv_sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")


@dataclass
class CascadeResult:
    """What one cascade did.

    The model ends compact whether the cascade slimmed after every step or recovered with masks (``slim: false``),
    so ``masks`` keep everything of the returned model and the kept indices name groups of the dense encoder.
    """

    masks: StructuredMasks
    budgets: list[BudgetReport]
    scores: dict[str, np.ndarray]
    fisher_counts: dict[str, dict[str, int]]
    recovery: dict[str, Any]
    timing: dict[str, float]
    kept_heads: list[list[int]]
    kept_channels: list[list[int]]
    kept_convs: list[list[int]] = field(default_factory=list)


def aligned_reference(reference: Mapping[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Slice dense reference tensors (SAM weights or Fisher) to the groups a compact encoder still holds."""
    out = dict(reference)
    for structure, block in zip(encoder_structure(encoder), prunable_blocks(encoder)):
        heads, channels = kept_indices(block)
        names, d = structure.param_slices(), structure.head_dim
        head_index = torch.tensor(heads)
        cols = (head_index[:, None] * d + torch.arange(d)).flatten()
        dense_heads = reference[names["qkv.weight"]].shape[0] // (3 * d)
        rows = head_qkv_rows(head_index, d, structure.qkv_layout, dense_heads)
        idx = torch.tensor(channels)
        for name, dim, index in (
            (names["qkv.weight"], 0, rows),
            (names["qkv.bias"], 0, rows),
            (names["proj.weight"], 1, cols),
            (names["attention_biases"], 0, head_index),
            (names["lin1.weight"], 0, idx),
            (names["lin1.bias"], 0, idx),
            (names["lin2.weight"], 1, idx),
        ):
            if name in reference:
                tensor = reference[name]
                out[name] = tensor.index_select(dim, index.to(tensor.device))
    for structure, block in zip(conv_structure(encoder), conv_blocks(encoder)):
        index = torch.tensor(conv_kept_indices(block))
        for name, dim in structure.param_slices().values():
            if name in reference:
                tensor = reference[name]
                out[name] = tensor.index_select(dim, index.to(tensor.device))
    return out


def _encoder_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.image_encoder.named_parameters()}


def _pi_weighted_fisher(fishers: Sequence[FisherResult], pi: torch.Tensor) -> dict[str, torch.Tensor]:
    return {name: sum(float(w) * f.fisher[name] for w, f in zip(pi, fishers)) for name in fishers[0].fisher}


def score_groups(
    method: str,
    fishers: Sequence[FisherResult],
    weights: Mapping[str, torch.Tensor],
    structure,
    fisher_sam: Mapping[str, torch.Tensor] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    pi: Sequence[float] | None = None,
    beta: float = 0.3,
    spread: str = "std",
    seed: int = 0,
    convs=(),
) -> tuple[GroupScores, dict[str, np.ndarray]]:
    """Head, channel and MBConv-channel scores for one method, plus the arrays worth saving (``scores.npz``).

    ``dual`` mixes zero and reset scores with the per-block alpha rule, ``zero`` is alpha = 1 (plain
    Fisher, OBD-style), ``reset`` is alpha = 0; ``taylor`` uses grouped first-order Taylor scores from
    calibration; ``magnitude`` and ``random`` need no data. Data-driven scores are aggregated over
    datasets with :func:`aggregate_datasets`. ``convs`` (the encoder's MBConv blocks, :func:`conv_structure`) adds
    scores of their hidden channels.
    """
    pi_t = normalised_weights(pi, len(fishers))
    details: dict[str, np.ndarray] = {"pi": pi_t.numpy()}
    if method == "random":
        return random_scores(structure, seed, convs), details
    if method == "magnitude":
        return magnitude_scores(weights, structure, convs), details
    if method == "taylor":
        if not fishers[0].taylor_heads:
            raise ValueError("taylor scores need calibration with group_taylor=True")
        per_dataset = [
            GroupScores(list(f.taylor_heads), list(f.taylor_channels), list(f.taylor_convs) if convs else [])
            for f in fishers
        ]
        return aggregate_datasets(per_dataset, pi_t.tolist(), beta, spread), details
    zero = [zero_scores(f.fisher, weights, structure, convs) for f in fishers]
    if method == "zero":
        per_dataset = zero
        alpha = torch.ones(len(structure), dtype=torch.float64)
    else:
        if fisher_sam is None or reference is None:
            raise ValueError(f"score {method!r} needs the SAM reference model")
        reset = [
            reset_scores(cross_fisher(f.fisher, fisher_sam), weights, reference, structure, convs) for f in fishers
        ]
        mean_zero = [sum(float(w) * z.heads[b] for w, z in zip(pi_t, zero)) for b in range(len(structure))]
        mean_reset = [sum(float(w) * r.heads[b] for w, r in zip(pi_t, reset)) for b in range(len(structure))]
        alpha = alpha_per_block(mean_zero, mean_reset) if method == "dual" else torch.zeros(len(structure))
        per_dataset = [mix_scores(z, r, alpha) for z, r in zip(zero, reset)]
        details["reset_heads_per_dataset"] = np.stack([torch.cat(r.heads).cpu().numpy() for r in reset])
        details["reset_channels_per_dataset"] = np.stack([torch.cat(r.channels).cpu().numpy() for r in reset])
    details["zero_heads_per_dataset"] = np.stack([torch.cat(z.heads).cpu().numpy() for z in zero])
    details["zero_channels_per_dataset"] = np.stack([torch.cat(z.channels).cpu().numpy() for z in zero])
    details["alpha_per_block"] = alpha.cpu().numpy()
    return aggregate_datasets(per_dataset, pi_t.tolist(), beta, spread), details


class CascadeState:
    """State of one cascade: the model, its masks or slimmed structure, and the calibration data.

    Args:
        model: the MedSAM being pruned (dense, or compact from an earlier run).
        reference_model: the general SAM (``dual`` / ``reset`` scores), or ``None``.
        calibration: per-dataset lists of preprocessed calibration samples (tight boxes, unique names).
        config: the cascade's settings.
        device: where calibration runs.
        progress: progress bars.
        methods: every score method this calibration must serve (default: ``config.score``).
        calibrator: the Fisher calibration (default: one from ``config.boundary_fisher_weight`` and
            ``config.fisher_reduction``).
    """

    def __init__(
        self,
        model,
        reference_model,
        calibration,
        config: CascadeConfig,
        device,
        progress=True,
        methods=None,
        calibrator: FisherCalibration | None = None,
    ):
        self.methods = set(methods or [config.score])  # which score methods this calibration must serve
        if not calibration or any(len(samples) == 0 for samples in calibration.values()):
            raise ValueError("every calibration dataset needs at least one sample")
        self.model, self.reference_model = model, reference_model
        self.calibration = dict(calibration)
        self.config, self.device, self.progress = config, torch.device(device), progress
        self.calibrator = calibrator or FisherCalibration(
            config.boundary_fisher_weight, config.fisher_reduction, progress
        )
        self.pooled = [s for samples in self.calibration.values() for s in samples]
        self.masks = StructuredMasks.for_encoder(model.image_encoder)
        self.hooks = None
        self.timing: dict[str, float] = {}
        self.fisher_counts: dict[str, dict[str, int]] = {}
        cfg = model.medcore_config
        self.dense_heads = list(cfg.dense_heads) if cfg is not None else None
        self.dense_mlp_dims = list(cfg.dense_mlp_dims) if cfg is not None else None
        self.dense_conv_dims = list(getattr(cfg, "dense_mbconv_hidden_dims", ())) or None

    def timed(self, stage: str, fn, *args, **kwargs):
        """Call ``fn`` and add its duration to ``timing[stage]``."""
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timing[stage] = self.timing.get(stage, 0.0) + time.perf_counter() - start
        return out

    def fisher_per_dataset(self, tag: str) -> list[FisherResult]:
        """Boundary-aware Fisher of the current model, one calibration per dataset (counts under ``tag``)."""
        results = []
        for name, samples in self.calibration.items():
            result = self.calibrator(
                self.model, samples, self.device, group_taylor="taylor" in self.methods, description=f"Fisher {name}"
            )
            self.fisher_counts[f"{tag}:{name}"] = {"used": result.used, "skipped": result.skipped}
            results.append(result)
        return results

    def sam_fisher(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | tuple[None, None]:
        """Fisher and encoder weights of the SAM reference (``None, None`` when no method needs them)."""
        if not self.methods & {"dual", "reset"}:
            return None, None
        if self.reference_model is None:
            raise ValueError(f"score {self.config.score!r} needs a SAM reference checkpoint (sam_ckpt)")
        self.reference_model.to(self.device)
        result = self.calibrator(self.reference_model, self.pooled, self.device, description="Fisher SAM")
        self.fisher_counts["sam"] = {"used": result.used, "skipped": result.skipped}
        weights = _encoder_weights(self.reference_model)
        self.reference_model.to("cpu")
        return result.fisher, {k: v.to(self.device) for k, v in weights.items()}

    def scores(self, fishers, fisher_sam, sam_weights, method=None, seed=None) -> tuple[GroupScores, dict]:
        """Head and channel scores of the current (possibly compact) encoder, see :func:`score_groups`."""
        encoder = self.model.image_encoder
        structure = encoder_structure(encoder)
        aligned_fs = aligned_reference(fisher_sam, encoder) if fisher_sam is not None else None
        aligned_ws = aligned_reference(sam_weights, encoder) if sam_weights is not None else None
        return score_groups(
            method or self.config.score,
            fishers,
            _encoder_weights(self.model),
            structure,
            aligned_fs,
            aligned_ws,
            self.config.pi,
            self.config.dist_beta,
            self.config.spread,
            self.config.seed if seed is None else seed,
            conv_structure(encoder),
        )

    def sensitivity(self, fishers) -> torch.Tensor:
        """Per-block sensitivity from the pi-weighted Fisher."""
        pi = normalised_weights(self.config.pi, len(fishers))
        return block_sensitivity(_pi_weighted_fisher(fishers, pi), encoder_structure(self.model.image_encoder))

    def conv_sensitivity(self, fishers) -> torch.Tensor:
        """Per-MBConv-block sensitivity from the pi-weighted Fisher (empty for SAM's ViT)."""
        pi = normalised_weights(self.config.pi, len(fishers))
        return block_sensitivity(_pi_weighted_fisher(fishers, pi), conv_structure(self.model.image_encoder))

    def apply(self, new_masks: StructuredMasks) -> None:
        """Slim the encoder to ``new_masks`` (or attach them as masks when ``config.slim`` is off)."""
        if self.config.slim:
            slim_encoder_(self.model.image_encoder, new_masks)
            self.masks = StructuredMasks.for_encoder(self.model.image_encoder)
            return
        self.masks = self.masks.intersect(new_masks)
        if self.hooks is not None:
            self.hooks.remove()
        self.hooks = attach_masks(self.model.image_encoder, self.masks)

    @property
    def masked(self) -> bool:
        """Whether removed groups are still in the network, switched off by mask hooks (``slim: false``)."""
        return self.hooks is not None

    def restore_masks(self, masks: StructuredMasks) -> None:
        """Switch ``masks`` back on after a resume: the training checkpoint holds the dense weights, not the hooks."""
        self.masks = StructuredMasks.for_encoder(self.model.image_encoder)
        self.hooks = None
        self.apply(masks)

    def compact_copy(self) -> nn.Module:
        """The network as its masks make it, with the removed groups gone.

        A copy when masked (costs are counted on it), so the cascade's own model keeps its hooks.
        """
        if not self.masked:
            return self.model
        self.hooks.remove()  # hooks hold the masks of the dense widths: they must not travel with the copy
        try:
            copy = deepcopy(self.model)
        finally:
            self.hooks = attach_masks(self.model.image_encoder, self.masks)
        slim_encoder_(copy.image_encoder, self.masks)
        return copy

    def finalize(self) -> None:
        """Remove the masked groups physically (nothing to do for a slimmed cascade); the function is unchanged.

        A masked cascade ends compact like a slimmed one, so what is saved is the pruned model, never the dense
        weights that the hooks were hiding.
        """
        if not self.masked:
            return
        self.hooks.remove()
        self.hooks = None
        slim_encoder_(self.model.image_encoder, self.masks)
        self.masks = StructuredMasks.for_encoder(self.model.image_encoder)

    def kept(self) -> tuple[list[list[int]], list[list[int]]]:
        """Kept heads and MLP channels per block, as indices of the original dense encoder."""
        present = [kept_indices(b) for b in prunable_blocks(self.model.image_encoder)]
        heads, channels = [h for h, _ in present], [c for _, c in present]
        if self.masked:  # mask positions index the (possibly already compact) network as it is
            heads = [[h[i] for i in kept] for h, kept in zip(heads, self.masks.kept_heads())]
            channels = [[c[i] for i in kept] for c, kept in zip(channels, self.masks.kept_channels())]
        return heads, channels

    def kept_convs(self) -> list[list[int]]:
        """Kept MBConv hidden channels per MBConv block, as indices of the original dense encoder."""
        present = [conv_kept_indices(b) for b in conv_blocks(self.model.image_encoder)]
        if self.masked:
            return [[c[i] for i in kept] for c, kept in zip(present, self.masks.kept_convs())]
        return present

    def plan(
        self, head_scores, channel_scores, sensitivity, family: str, conv_scores=None, conv_sensitivity=None
    ) -> list[BudgetReport]:
        """Choose the step's removals within the budgets and apply them; returns the budget reports.

        ``conv_scores`` (with ``conv_sensitivity``) also removes MBConv hidden channels to ``mbconv_sparsity``.
        """
        cfg = self.config
        new_masks, reports = plan_masks(
            self.masks,
            head_scores,
            channel_scores,
            sensitivity,
            head_sparsity=cfg.head_sparsity,
            mlp_sparsity=cfg.mlp_sparsity,
            min_keep_heads=cfg.min_keep_heads,
            min_keep_mlp_fraction=cfg.min_keep_mlp_fraction,
            protected=cfg.protected_blocks,
            additional=cfg.continuation,
            dense_heads=self.dense_heads,
            dense_mlp_dims=self.dense_mlp_dims,
            conv_scores=conv_scores,
            conv_sensitivity=conv_sensitivity,
            conv_sparsity=cfg.mbconv_sparsity,
            dense_conv_dims=self.dense_conv_dims,
        )
        self.apply(new_masks)
        return reports


def initial_scores(state: CascadeState):
    """Calibrate and score the model as it is: ``(scores, arrays, sensitivity, SAM Fisher, SAM weights)``."""
    fishers = state.timed("fisher", state.fisher_per_dataset, "initial")
    fisher_sam, sam_weights = state.timed("fisher_sam", state.sam_fisher)
    scores, details = state.timed("scores", state.scores, fishers, fisher_sam, sam_weights)
    sensitivity = state.sensitivity(fishers)
    details["block_sensitivity"] = sensitivity.numpy()
    details["head_scores"] = torch.cat(scores.heads).cpu().numpy()
    details["mlp_scores"] = torch.cat(scores.channels).cpu().numpy()
    _add_conv_details(details, scores, state.conv_sensitivity(fishers))
    return scores, details, sensitivity, fisher_sam, sam_weights


def _add_conv_details(details: dict[str, np.ndarray], scores: GroupScores, sensitivity: torch.Tensor) -> None:
    """MBConv scores and block sensitivity (TinyViT only) go with the arrays saved to ``scores.npz``."""
    if scores.convs:
        details["mbconv_scores"] = torch.cat(scores.convs).cpu().numpy()
        details["mbconv_sensitivity"] = sensitivity.numpy()


def score_model(
    model: nn.Module,
    calibration: Mapping[str, Sequence[Mapping[str, Any]]],
    config: CascadeConfig = CascadeConfig(),
    reference_model: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    fisher_counts: dict[str, dict[str, int]] | None = None,
) -> tuple[GroupScores, dict[str, np.ndarray], torch.Tensor]:
    """Calibrate and score without pruning: ``(scores, arrays for scores.npz, block sensitivity)``.

    ``fisher_counts``, when given, receives the used/skipped sample counts of each calibration.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    state = CascadeState(model, reference_model, calibration, config, device, progress)
    scores, details, sensitivity, _, _ = initial_scores(state)
    if fisher_counts is not None:
        fisher_counts.update(state.fisher_counts)
    return scores, details, sensitivity


def score_model_methods(
    model: nn.Module,
    calibration: Mapping[str, Sequence[Mapping[str, Any]]],
    methods: Sequence[tuple[str, int]],
    config: CascadeConfig = CascadeConfig(),
    reference_model: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[tuple[str, int], tuple[GroupScores, dict[str, np.ndarray], torch.Tensor]]:
    """One calibration, several ``(method, seed)`` scorings: inputs for ``run_cascade(precomputed=...)``.

    Every method shares the same Fisher and hence the same block budgets, so comparisons isolate the ranking.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    state = CascadeState(model, reference_model, calibration, config, device, progress, [m for m, _ in methods])
    fishers = state.fisher_per_dataset("initial")
    fisher_sam, sam_weights = state.sam_fisher()
    sensitivity = state.sensitivity(fishers)
    conv_sensitivity = state.conv_sensitivity(fishers)
    out = {}
    for method, seed in methods:
        scores, details = state.scores(fishers, fisher_sam, sam_weights, method=method, seed=seed)
        details["block_sensitivity"] = sensitivity.numpy()
        _add_conv_details(details, scores, conv_sensitivity)
        out[(method, seed)] = (scores, details, sensitivity)
    return out
