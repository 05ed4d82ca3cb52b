"""A complete pruning run: data, calibration, cascade, evaluation before/after, outputs.

``run_prune(**settings)`` is what the bundle's ``prune`` workflow calls. It writes into
``output_dir``: ``report.json``, ``report.md`` with PNG plots, ``scores.npz``, ``splits.json``, the
compact pruned checkpoint ``model_pruned.pt`` (reloadable with :func:`medcore_monai.networks.load_sam`)
and the recovery checkpoints.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import SplitData, dataset_specs, is_volumetric, prepare_splits, preprocess_split
from ..files import atomic_path, write_json_atomic
from ..losses.recovery import RecoveryLossWeights
from ..networks import MedSAM, as_medsam, count_parameters, file_sha256, load_sam, save_sam
from ..networks.structure import measure_flops
from ..pruning.cascade import CascadeConfig, CascadeResult, run_cascade
from .common import input_problems, raise_problems
from .distributed import initialise_from_environment, is_main_process, process_device, synchronise
from .evaluation import evaluate_items, summarise
from .recovery import RecoveryConfig

__all__ = ["PruneSettings", "calibration_samples", "model_cost", "run_prune", "write_json_atomic"]

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


def model_cost(model: MedSAM) -> dict[str, int]:
    """Parameters and measured FLOPs (batch 1, one box) of the encoder and of the whole model."""
    size = model.img_size
    box = torch.tensor([[0.0, 0.0, size / 2, size / 2]])
    total_flops, per_module = measure_flops(model, torch.zeros(1, 3, size, size), box)
    return {
        "encoder_params": count_parameters(model.image_encoder),
        "total_params": count_parameters(model),
        # one counted forward gives both; the encoder's share is its submodule entry
        "encoder_flops": per_module[f"{type(model).__name__}.image_encoder"],
        "total_flops": total_flops,
    }


def _check_inputs(settings: PruneSettings) -> None:
    checkpoints = {key: getattr(settings, key) for key in ("medsam_ckpt", "sam_ckpt")}
    problems = input_problems(checkpoints, list(settings.data_roots))
    if settings.score in ("dual", "reset") and not settings.sam_ckpt:
        problems.append(f"score {settings.score!r} needs sam_ckpt (the general SAM the medical model came from)")
    if settings.dataset_names is not None and len(settings.dataset_names) != len(settings.data_roots):
        problems.append(f"{len(settings.dataset_names)} dataset_names for {len(settings.data_roots)} data_roots")
    out = Path(settings.output_dir).resolve()
    for key in ("medsam_ckpt", "sam_ckpt"):
        path = getattr(settings, key)
        if path and Path(path).resolve().parent == out and Path(path).name == "model_pruned.pt":
            problems.append(f"output_dir would overwrite the input checkpoint {path}")
    raise_problems(problems, "pruning")


def _load_models(settings: PruneSettings) -> tuple[MedSAM, MedSAM | None]:
    medsam = load_sam(settings.medsam_ckpt) if settings.medsam_ckpt else None
    if medsam is None:
        raise ValueError("medsam_ckpt is required")
    reference = None
    if settings.sam_ckpt and settings.score in ("dual", "reset"):
        reference = MedSAM(load_sam(settings.sam_ckpt), pixel_normalize=settings.sam_pixel_normalize)
    return as_medsam(medsam), reference


def _evaluate(model: MedSAM, data: SplitData, settings: PruneSettings, device) -> dict[str, dict[str, float]]:
    results = {}
    for dataset in data.items:
        items = data.split(dataset, settings.eval_split)[: settings.max_eval_images]
        rows = evaluate_items(
            model, items, device, settings.seed, settings.eval_bbox_shift, settings.label_value, settings.progress
        )
        results[dataset] = summarise(rows) | {"units": "mm, per volume" if is_volumetric(items) else "pixels"}
    keys = [k for k in next(iter(results.values())) if k not in ("n", "units")]
    results["macro"] = {k: float(np.mean([results[d][k] for d in data.items])) for k in keys}
    return results


def calibration_samples(model: MedSAM, data: SplitData, settings: PruneSettings) -> dict[str, list[dict[str, Any]]]:
    """Preprocessed calibration samples (tight boxes) per dataset, named ``<dataset>/<sample>``."""
    out = {}
    for dataset in data.items:
        items = data.split(dataset, "calibration")
        samples = preprocess_split(items, model.img_size, 0, settings.seed, settings.label_value)
        out[dataset] = [dict(samples[i]) | {"name": f"{dataset}/{samples[i]['name']}"} for i in range(len(samples))]
    return out


def _save_scores(path: Path, result: CascadeResult) -> None:
    with atomic_path(path) as tmp:
        np.savez(tmp, **result.scores)


def run_prune(**settings_kwargs: Any) -> dict[str, Any]:
    """Prune a MedSAM checkpoint on the given datasets and write the outputs (see module docstring).

    Returns:
        The report (also in ``report.json``).
    """
    settings = PruneSettings.from_mapping(settings_kwargs)
    _check_inputs(settings)
    initialise_from_environment()
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    device = process_device(settings.device)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model, reference = _load_models(settings)
    model.to(device)
    data = prepare_splits(
        dataset_specs(settings.data_roots, settings.dataset_names, settings.label_value),
        seed=settings.seed,
        val_fraction=settings.val_fraction,
        test_fraction=settings.test_fraction,
        cal_size=settings.cal_size,
        manifest_path=settings.split_manifest,
    )
    if is_main_process():
        data.manifest.save(output_dir / "splits.json")
    timing: dict[str, float] = {"load": time.perf_counter() - start}

    t0 = time.perf_counter()
    cost_before = model_cost(model)
    metrics_before = _evaluate(model, data, settings, device)
    timing["evaluate_before"] = time.perf_counter() - t0

    calibration = calibration_samples(model, data, settings)
    stages = [_stage_row("dense", cost_before, metrics_before)]
    t0 = time.perf_counter()
    precomputed, leverage, scoring_counts = _leverage_before_pruning(
        model, calibration, reference, settings, device, output_dir
    )
    if leverage is not None:
        timing["scores_and_leverage"] = time.perf_counter() - t0

    def evaluate_stage(stage: str, pruned: MedSAM) -> None:
        if settings.evaluate_stages and stage != "mlp":  # the final model is evaluated below anyway
            t0 = time.perf_counter()
            stages.append(_stage_row(f"after {stage}", model_cost(pruned), _evaluate(pruned, data, settings, device)))
            timing[f"evaluate_after_{stage}"] = time.perf_counter() - t0

    result = run_cascade(
        model,
        calibration,
        settings.cascade_config(),
        reference,
        device,
        output_dir,
        settings.progress,
        precomputed=precomputed,
        on_stage=evaluate_stage,
        tensorboard_dir=settings.tensorboard_dir,
    )
    timing.update({f"cascade_{k}": v for k, v in result.timing.items()})

    t0 = time.perf_counter()
    cost_after = model_cost(model)
    metrics_after = _evaluate(model, data, settings, device)
    timing["evaluate_after"] = time.perf_counter() - t0
    stages.append(_stage_row("after mlp", cost_after, metrics_after))

    report = {
        "config": asdict(settings),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)},
        "inputs": {
            key: {"path": getattr(settings, key), "sha256": file_sha256(getattr(settings, key))}
            for key in ("medsam_ckpt", "sam_ckpt")
            if getattr(settings, key)
        },
        "split_manifest": "splits.json",
        "datasets": {
            d: {s: len(data.split(d, s)) for s in ("train", "val", "test", "calibration")} for d in data.items
        },
        "budgets": [r.to_dict() for r in result.budgets],
        "kept_heads": result.kept_heads,
        "kept_channels": result.kept_channels,
        "cost": {"before": cost_before, "after": cost_after},
        "reduction": {
            key: 1.0 - cost_after[key] / cost_before[key] for key in ("encoder_params", "total_params", "encoder_flops")
        },
        "metrics": {d: {"before": metrics_before[d], "after": metrics_after[d]} for d in [*data.items, "macro"]},
        "stages": stages,
        "leverage": leverage,
        # scores computed before the cascade (with leverage) carry their own calibration counts
        "fisher_samples": scoring_counts | result.fisher_counts,
        "recovery": {stage: {"steps": log["steps"], "losses": log["losses"]} for stage, log in result.recovery.items()},
        "timing": timing,
    }
    report["outputs"] = {"checkpoint": "model_pruned.pt", "scores": "scores.npz", "report_md": "report.md"}
    timing["total"] = time.perf_counter() - start
    if is_main_process():  # every process holds the same pruned model and report
        _write_outputs(model, report, result, output_dir)
    synchronise()
    logger.info("pruning finished in %.1f s; outputs in %s", timing["total"], output_dir)
    return report


def _write_outputs(model: MedSAM, report: dict[str, Any], result: CascadeResult, output_dir: Path) -> None:
    save_sam(model, output_dir / report["outputs"]["checkpoint"], metadata={"prune_report": "report.json"})
    _save_scores(output_dir / "scores.npz", result)
    dense_config = model.medcore_config
    _write_markdown(report, result, output_dir, (dense_config.num_heads, dense_config.mlp_dim))
    write_json_atomic(output_dir / "report.json", report)


def _stage_row(stage: str, cost: Mapping[str, int], metrics: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """One point of the cost-vs-quality curve: the model after a cascade stage, macro metrics."""
    return {"method": "cascade", "stage": stage, **cost, **{k: v for k, v in metrics["macro"].items() if k != "n"}}


def _leverage_before_pruning(
    model: MedSAM,
    calibration: Mapping[str, Sequence[Mapping[str, Any]]],
    reference: MedSAM | None,
    settings: PruneSettings,
    device: torch.device,
    output_dir: Path,
) -> tuple[tuple | None, dict[str, Any] | None, dict[str, dict[str, int]]]:
    """With ``leverage``: score once, measure BLR95 on the dense model, and hand the scores to the cascade.

    Returns:
        ``(scores for the cascade or None, leverage result or None, calibration counts of those scores)``.
    """
    if not settings.leverage:
        return None, None, {}
    from ..pruning.cascade import score_model
    from .leverage import run_leverage_analysis

    config = settings.cascade_config()
    counts: dict[str, dict[str, int]] = {}
    precomputed = score_model(model, calibration, config, reference, device, settings.progress, counts)
    # the grid costs (levels x levels x samples) forward passes: a subset of the calibration images is enough
    subset = {name: list(group)[: settings.leverage_samples] for name, group in calibration.items()}
    leverage = run_leverage_analysis(
        model,
        subset,
        config,
        reference,
        head_levels=tuple(settings.leverage_head_levels),
        mlp_levels=tuple(settings.leverage_mlp_levels),
        device=device,
        output_dir=output_dir / "leverage" if is_main_process() else None,
        precomputed=precomputed,
    )
    if config.recompute_mlp_scores:  # re-scoring after the head step needs fresh Fisher sums: the cascade calibrates
        return None, leverage, {}
    return precomputed, leverage, counts


def _write_markdown(report: dict[str, Any], result: CascadeResult, output_dir: Path, dense: tuple[int, int]) -> None:
    from ..reports import plot_budget_curves, plot_kept_per_block, plot_score_scatter, write_report_markdown

    images = {
        "Kept heads and MLP channels per block": plot_kept_per_block(
            [len(k) for k in result.kept_heads],
            dense[0],
            [len(k) for k in result.kept_channels],
            dense[1],
            output_dir / "kept_per_block.png",
        )
    }
    units = {m["before"]["units"] for d, m in report["metrics"].items() if d != "macro"}
    unit = "mm" if units == {"mm, per volume"} else "px" if units == {"pixels"} else "px / mm"
    images["Encoder parameters vs BF1 and HD95 across the cascade"] = plot_budget_curves(
        report["stages"], output_dir / "budget_curve.png", metrics=("bf1", "hd95"), distance_unit=unit
    )
    if report["leverage"] is not None:
        images[f"Boundary leverage (BLR95 {report['leverage']['summary']['blr95']:.2f})"] = (
            output_dir / "leverage" / "leverage_histogram.png"
        )
    if "reset_heads_per_dataset" in result.scores:
        zero = result.scores["zero_heads_per_dataset"].mean(0)
        reset = result.scores["reset_heads_per_dataset"].mean(0)
        images["Zero vs reset head scores"] = plot_score_scatter(zero, reset, output_dir / "score_scatter.png")
    write_report_markdown(report, output_dir / "report.md", images)
