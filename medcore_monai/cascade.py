"""Python entry points of the cascade, built from the same engine and handlers as the bundle's ``prune`` workflow.

:func:`run_cascade` prunes a model in place (heads -> recovery -> MLP channels -> recovery) with a
:class:`~medcore_monai.engines.RecoveryTrainer` carrying a :class:`~medcore_monai.handlers.PruningHandler`;
:func:`recover` runs one recovery on its own. Benchmarks and tests call these; the bundle wires the same objects
in ``bundle/configs/prune.yaml``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from monai.utils import CommonKeys as Keys
from torch import nn

from .engines.recovery import RecoveryTrainer, TeacherOutputs, recovery_loader, recovery_taps
from .handlers.checkpointing import TrainingCheckpoint
from .handlers.pruning import PruningHandler
from .handlers.training import StageLrSchedule
from .networks.structure import StructuredMasks
from .pruning.budget import BudgetReport
from .pruning.cascade import CascadeConfig, CascadeResult, RecoveryConfig

__all__ = ["adamw_factory", "recover", "run_cascade"]


def adamw_factory(config: RecoveryConfig) -> Callable[[Sequence[nn.Parameter]], torch.optim.Optimizer]:
    """The recovery optimizer (AdamW with the config's learning rate and weight decay) as a factory."""

    def build(params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)

    return build


def _progress(trainer: RecoveryTrainer, enabled: bool, description: str) -> None:
    if enabled and idist.get_rank() == 0:
        from ignite.handlers import ProgressBar

        ProgressBar(desc=description, persist=False).attach(trainer, output_transform=lambda out: out[Keys.LOSS])


def _tensorboard(trainer: RecoveryTrainer, log_dir: str | Path | None) -> None:
    if log_dir is None:
        return
    from .engines.tensorboard import attach_tensorboard

    def terms(output: Mapping[str, Any]) -> dict[str, float]:
        return {"loss": output[Keys.LOSS]} | {k[5:]: v for k, v in output.items() if k.startswith("loss_")}

    attach_tensorboard(trainer, log_dir, "recovery", terms)


def _recovery_trainer(
    model: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    config: RecoveryConfig,
    teacher: TeacherOutputs,
    device: torch.device,
    stages: int,
    checkpoint_dir: str | Path | None,
    handlers: Sequence[Any],
) -> RecoveryTrainer:
    """A recovery trainer of ``stages`` epochs, resumable from ``checkpoint_dir`` when given."""
    every = max(1, config.steps // 4)
    resume = [TrainingCheckpoint(checkpoint_dir, every_iterations=every)] if checkpoint_dir is not None else []
    schedule = [] if config.lr_schedule == "constant" else [StageLrSchedule(config.lr_schedule)]
    return RecoveryTrainer(
        device=device,
        max_epochs=stages,
        train_data_loader=recovery_loader(samples, config.steps, config.batch_size, config.seed),
        network=model,
        optimizer=adamw_factory(config),
        teacher=teacher,
        loss_weights=config.loss,
        epoch_length=max(1, config.steps),
        amp=config.amp,
        train_handlers=[*resume, *schedule, *handlers],
        skip_updates=config.steps == 0,
    )


def recover(
    model: nn.Module,
    teacher: TeacherOutputs,
    samples: Sequence[Mapping[str, Any]],
    config: RecoveryConfig = RecoveryConfig(),
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    description: str = "recovery",
) -> dict[str, Any]:
    """Run ``config.steps`` recovery iterations on ``model`` (a MedSAM) in place: one :class:`RecoveryTrainer` epoch.

    Only the image encoder trains; every parameter's ``requires_grad`` flag is restored afterwards. With
    ``checkpoint_dir`` the training state is saved as it goes (:class:`TrainingCheckpoint`) and a later call
    resumes from it, ending with the same model as an uninterrupted call.

    Returns:
        ``{"steps", "losses"}`` with the per-iteration total loss (of the whole run, across a resume).
    """
    if config.steps == 0:
        return {"steps": 0, "losses": []}
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    trainer = _recovery_trainer(model, samples, config, teacher, device, 1, checkpoint_dir, [])
    _progress(trainer, progress, description)
    trainer.run()
    return {"steps": config.steps, "losses": trainer.losses.get(1, [])}


def run_cascade(
    model: nn.Module,
    calibration: Mapping[str, Sequence[Mapping[str, Any]]],
    config: CascadeConfig = CascadeConfig(),
    reference_model: nn.Module | None = None,
    device: torch.device | str | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    precomputed: tuple | None = None,
    on_stage: Callable[[str, nn.Module], None] | None = None,
    tensorboard_dir: str | Path | None = None,
    recovery_samples: Sequence[Mapping[str, Any]] | None = None,
) -> CascadeResult:
    """Prune ``model`` (a :class:`~medcore_monai.networks.MedSAM`) in place.

    Args:
        model: the medical model; dense, or compact from an earlier run (continuation).
        calibration: per-dataset lists of preprocessed calibration samples with tight boxes and unique names.
        config: budgets, score method and recovery settings.
        reference_model: the general SAM (as a MedSAM module); needed for ``dual`` and ``reset``.
        device: where everything runs (default: the model's device).
        output_dir: the training state is checkpointed to ``output_dir/recovery`` (resumable).
        progress: progress bars.
        precomputed: ``(scores, details, sensitivity)`` from :func:`~medcore_monai.pruning.score_model` on this
            model and calibration, to prune one model at several budgets without calibrating again.
        on_stage: called as ``on_stage(stage, model)`` after each step's recovery (``"heads"``, ``"mlp"``).
        tensorboard_dir: log the recovery losses there.
        recovery_samples: the images recovery trains on (tight boxes and unique names, like the calibration
            samples); default: the calibration samples.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    pooled = [s for samples in calibration.values() for s in samples]
    if not calibration or any(len(samples) == 0 for samples in calibration.values()):
        raise ValueError("every calibration dataset needs at least one sample")
    recovery = config.recovery
    samples = list(recovery_samples) if recovery_samples is not None else pooled
    taps = recovery_taps(model, recovery.loss)
    teacher = TeacherOutputs(model, cache=config.teacher_cache, taps=taps).precompute(samples, device)
    pruning = PruningHandler(config, calibration, reference_model, precomputed, progress, on_stage)
    folder = Path(output_dir) / "recovery" if output_dir else None
    trainer = _recovery_trainer(model, samples, recovery, teacher, device, 2, folder, [pruning])
    _progress(trainer, progress, "recovery")
    _tensorboard(trainer, tensorboard_dir)
    trainer.run()
    kept_heads, kept_channels = pruning.kept(trainer)
    losses = {name: trainer.losses.get(i + 1, []) for i, name in enumerate(pruning.applied)}
    return CascadeResult(
        # a run resumed in its last stage never re-plans, so it has no cascade state: its (slim) masks are full
        masks=pruning.state.masks if pruning.state is not None else StructuredMasks.for_encoder(model.image_encoder),
        budgets=[
            BudgetReport(**{k: b[k] for k in ("family", "requested", "achieved", "total", "per_block")})
            for b in pruning.budgets
        ],
        scores=pruning.details,
        fisher_counts=pruning.fisher_counts,
        recovery={name: {"steps": recovery.steps, "losses": losses[name]} for name in pruning.applied},
        timing=pruning.timing,
        kept_heads=kept_heads,
        kept_channels=kept_channels,
        kept_convs=pruning.kept_convs(trainer),
    )
