"""Pruning runs from Python: :func:`run_prune` runs the bundle's ``prune`` workflow.

It writes into ``output_dir``: ``report.json``, ``report.md`` with PNG plots, ``scores.npz``, ``splits.json``,
the compact pruned checkpoint ``model_pruned.pt`` (reloadable with :func:`medcore_monai.networks.load_sam`) and
the resumable training state under ``recovery/``. :class:`PruneSettings` and :func:`calibration_samples` serve the
function-based ``leverage`` workflow and the benchmarks, which still build their calibration data in Python.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .losses.recovery import RecoveryLossWeights
from .networks import MedSAM
from .pruning.cascade import CascadeConfig, RecoveryConfig
from .transforms.samples import SplitData, preprocess_split

__all__ = ["PruneSettings", "calibration_samples", "run_prune"]

logger = logging.getLogger(__name__)


# the cascade's own defaults are the single source of the flat settings' defaults
_CASCADE, _RECOVERY, _LOSS = CascadeConfig(), RecoveryConfig(), RecoveryLossWeights()


@dataclass
class PruneSettings:
    """All settings of a pruning run (the bundle's config keys)."""

    medsam_ckpt: str | None = None
    sam_ckpt: str | None = None
    data_roots: Sequence[str] = ()
    dataset_names: Sequence[str] | None = None
    output_dir: str = "outputs/prune"
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 42
    head_sparsity: float = _CASCADE.head_sparsity
    mlp_sparsity: float = _CASCADE.mlp_sparsity
    score: str = _CASCADE.score
    protected_blocks: Sequence[int] = ()
    min_keep_heads: int = _CASCADE.min_keep_heads
    min_keep_mlp_fraction: float = _CASCADE.min_keep_mlp_fraction
    boundary_fisher_weight: float = _CASCADE.boundary_fisher_weight
    fisher_reduction: str = _CASCADE.fisher_reduction
    dist_beta: float = _CASCADE.dist_beta
    spread: str = _CASCADE.spread
    pi: Sequence[float] | None = None
    recompute_mlp_scores: bool = _CASCADE.recompute_mlp_scores
    continuation: bool = _CASCADE.continuation
    slim: bool = _CASCADE.slim
    recovery_steps: int = _RECOVERY.steps
    recovery_lr: float = _RECOVERY.lr
    recovery_batch_size: int = _RECOVERY.batch_size
    boundary_loss_weight: float = _LOSS.boundary
    feat_distill_weight: float = _LOSS.feature
    logit_distill_weight: float = _LOSS.logit
    freq_pred_loss_weight: float = _LOSS.frequency
    cal_size: int = 128
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    eval_split: str = "test"
    eval_bbox_shift: int = 5
    max_eval_images: int | None = None
    label_value: int | None = None
    split_manifest: str | None = None
    sam_pixel_normalize: bool = True
    cache: str = "memory"
    amp: bool = False
    progress: bool = True
    evaluate_stages: bool = True
    leverage: bool = False
    leverage_head_levels: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    leverage_mlp_levels: Sequence[float] = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95)
    leverage_samples: int | None = None
    tensorboard_dir: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PruneSettings:
        """Build from a dict, rejecting unknown keys with one clear message."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown prune settings: {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def cascade_config(self) -> CascadeConfig:
        """The cascade part of the settings."""
        recovery = RecoveryConfig(
            steps=self.recovery_steps,
            lr=self.recovery_lr,
            batch_size=self.recovery_batch_size,
            seed=self.seed,
            amp=self.amp,
            loss=RecoveryLossWeights(
                boundary=self.boundary_loss_weight,
                feature=self.feat_distill_weight,
                logit=self.logit_distill_weight,
                frequency=self.freq_pred_loss_weight,
            ),
        )
        return CascadeConfig(
            head_sparsity=self.head_sparsity,
            mlp_sparsity=self.mlp_sparsity,
            score=self.score,
            protected_blocks=tuple(self.protected_blocks),
            min_keep_heads=self.min_keep_heads,
            min_keep_mlp_fraction=self.min_keep_mlp_fraction,
            boundary_fisher_weight=self.boundary_fisher_weight,
            fisher_reduction=self.fisher_reduction,
            dist_beta=self.dist_beta,
            spread=self.spread,
            pi=None if self.pi is None else tuple(self.pi),
            recompute_mlp_scores=self.recompute_mlp_scores,
            continuation=self.continuation,
            slim=self.slim,
            seed=self.seed,
            recovery=recovery,
        )


def calibration_samples(model: MedSAM, data: SplitData, settings: PruneSettings) -> dict[str, list[dict[str, Any]]]:
    """Preprocessed calibration samples (tight boxes) per dataset, named ``<dataset>/<sample>``."""
    out = {}
    for dataset in data.items:
        items = data.split(dataset, "calibration")
        samples = preprocess_split(items, model.img_size, 0, settings.seed, settings.label_value)
        out[dataset] = [dict(samples[i]) | {"name": f"{dataset}/{samples[i]['name']}"} for i in range(len(samples))]
    return out


def run_prune(**settings: Any) -> dict[str, Any]:
    """Prune a MedSAM checkpoint with the bundle's ``prune`` workflow (``train.yaml`` + ``prune.yaml``).

    ``settings`` are the bundle's config ids (``medsam_ckpt``, ``sam_ckpt``, ``data_roots``, ``output_dir``,
    ``head_sparsity``, ...; ``docs/bundle.md``). Unknown ids fail before any work.

    Returns:
        The report (also in ``<output_dir>/report.json``).
    """
    from .bundle import run_workflow

    output_dir = Path(settings.get("output_dir", "outputs/prune"))
    run_workflow("prune", ("train.yaml", "prune.yaml"), **settings)
    return json.loads((output_dir / "report.json").read_text())
