"""Fine-tuning of a (pruned) MedSAM from Python with MONAI's SupervisedTrainer, resumable epoch by epoch.

The bundle's ``finetune`` run does not use this module: it is train.yaml with the finetune.yaml overlay
(:mod:`medcore_monai.handlers.finetuning`). This engine stays for Python callers (``benchmarks/robustness.py``)
and for :func:`finetune_loss` (``engines/pair.py``).

Loss: squared-denominator soft Dice + mean BCE-with-logits on the decoder's low-resolution logits vs
``label_lowres``. AdamW over the image encoder and mask decoder by default (``trainable``; the IoU
head is frozen), a per-epoch cosine schedule from ``lr`` to ``0.01 * lr``, gradient-norm clipping, AMP on CUDA only,
early stopping and best-model selection on the validation loss.

Files in ``output_dir``:

* ``checkpoint_best.pth``: the best model, written with :func:`~medcore_monai.networks.save_sam`, so a
  compact (slimmed) model stays compact and reloads with :func:`~medcore_monai.networks.load_sam`;
* ``checkpoint_latest.pth``: the training state after the last completed epoch (network, optimizer,
  scheduler, trainer, early stopping, history, and the AMP scaler when used) for ``resume``;
* ``history.json``: per-epoch train / validation loss and learning rate.

Under several processes (``torchrun``, ``idist.Parallel``) the network trains wrapped in
``DistributedDataParallel``; give each process its shard of the data (e.g.
:func:`~medcore_monai.engines.distributed.distributed_loader`). Ignite's metrics average the losses over
all processes, so every process takes the same early-stopping and best-model decisions, and only the
main process writes the files.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EarlyStopping, ProgressBar
from ignite.handlers.checkpoint import BaseSaveHandler
from ignite.metrics import Average, Loss
from monai.engines import IterationEvents, SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler, from_engine
from monai.utils import CommonKeys as Keys
from torch import nn

from ..files import write_json_atomic
from ..losses import soft_dice_loss
from ..networks import MedSAM, load_state_dict_strict, read_checkpoint, read_model_state, save_sam
from ..networks.checkpoint import atomic_torch_save
from .common import clip_gradients, prepare_medsam_batch, preserved_requires_grad
from .distributed import data_parallel, is_main_process, synchronise
from .tensorboard import attach_tensorboard

__all__ = [
    "BEST_CHECKPOINT",
    "FinetuneObjective",
    "HISTORY_FILE",
    "LATEST_CHECKPOINT",
    "cosine_lr_factor",
    "finetune",
    "finetune_loss",
]

logger = logging.getLogger(__name__)

BEST_CHECKPOINT = "checkpoint_best.pth"
LATEST_CHECKPOINT = "checkpoint_latest.pth"
HISTORY_FILE = "history.json"
MIN_LR_RATIO = 0.01
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- loss and schedule


def finetune_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared-denominator soft Dice + mean BCE-with-logits, computed in float32 (also under AMP)."""
    logits = logits.float()
    target = target.to(logits.dtype)
    return soft_dice_loss(logits, target, squared=True) + F.binary_cross_entropy_with_logits(logits, target)


def cosine_lr_factor(epoch: int, epochs: int, min_ratio: float = MIN_LR_RATIO) -> float:
    """Learning-rate multiplier of the 0-based ``epoch``: 1 for the first epoch, ``min_ratio`` for the last.

    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * epoch / (epochs - 1))) / 2``, constant after the end.
    """
    progress = min(epoch / max(epochs - 1, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _cosine_scheduler(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    # A closed form of this call's `epochs` (not CosineAnnealingLR's recursion, and a plain function that
    # LambdaLR does not serialise): a run resumed with more epochs follows the new schedule.
    def factor(epoch: int) -> float:
        return cosine_lr_factor(epoch, epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rates from the schedule at the scheduler's (restored) epoch."""
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


# --------------------------------------------------------------------------- training record


class _TrainingRecord:
    """Per-epoch history and the best monitored loss; checkpointed with the training state."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.best_loss: float | None = None
        self.best_epoch: int = 0

    def add(self, entry: dict[str, Any]) -> bool:
        """Append an epoch; return whether its monitored loss is the best so far (strictly lower)."""
        self.history.append(entry)
        improved = self.best_loss is None or entry["monitored_loss"] < self.best_loss
        if improved:
            self.best_loss, self.best_epoch = entry["monitored_loss"], entry["epoch"]
        return improved

    @property
    def last_monitored(self) -> float:
        """Monitored loss of the last recorded epoch."""
        return self.history[-1]["monitored_loss"]

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only, so ``torch.load(weights_only=True)`` reads the checkpoint."""
        return {"history": [dict(e) for e in self.history], "best_loss": self.best_loss, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.history = [dict(e) for e in state["history"]]
        self.best_loss = state["best_loss"]
        self.best_epoch = int(state["best_epoch"])


class _AtomicSaver(BaseSaveHandler):
    """Ignite save handler writing one fixed file by atomic rename.

    Ignite removes the previous file *before* saving the next one; with a fixed name that removal is
    skipped and ``os.replace`` swaps the files, so an interruption never leaves no checkpoint.
    """

    def __init__(self, dirname: Path) -> None:
        self.dirname = dirname

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if is_main_process():  # every process holds the same state; one file
            atomic_torch_save(dict(checkpoint), self.dirname / filename)

    def remove(self, filename: str) -> None:
        """Nothing to do: the next save replaces the file atomically."""


# --------------------------------------------------------------------------- engine construction


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _use_amp(amp: bool, device: torch.device) -> bool:
    if amp and device.type != "cuda":
        logger.info("amp=True ignored: mixed precision is only used on CUDA (device is %s)", device)
        return False
    return amp


def _freeze_outside(model: MedSAM, trainable: Sequence[str]) -> None:
    """Freeze every parameter outside the ``trainable`` submodules, and the IoU head.

    Inside them the current flags stay, so a caller's own freezing (e.g. an SVD adaptation that trains
    only singular-value scales) is kept. The IoU head never reaches the segmentation loss: leaving it
    trainable would only give DDP parameters without gradients.
    """
    unknown = [name for name in trainable if not hasattr(model, name)]
    if unknown:
        choices = "image_encoder, prompt_encoder, mask_decoder"
        raise ValueError(f"unknown trainable modules {unknown}; choose from {choices}")
    for name, param in model.named_parameters():
        inside = any(name.startswith(f"{prefix}.") for prefix in trainable)
        if not inside or name.startswith("mask_decoder.iou_prediction_head."):
            param.requires_grad_(False)


@dataclass(frozen=True)
class FinetuneObjective:
    """What one fine-tuning step computes: the network the engines call, its batch layout and the loss.

    The default trains the model itself with :func:`finetune_loss` on ``prepare_medsam_batch`` batches.
    Another objective (e.g. RobustSAM's clean-vs-degraded consistency,
    :func:`medcore_monai.engines.robust.consistency_objective`) wraps the model in a module whose output
    its loss understands; validation uses the same three, so the monitored loss is the trained one.
    """

    network: nn.Module | None = None
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = finetune_loss
    prepare_batch: Callable[..., Any] = prepare_medsam_batch


def _loss_metric_value(output: Mapping[str, Any]) -> torch.Tensor:
    return output[Keys.LOSS].detach()


def _build_evaluator(
    network: nn.Module,
    objective: FinetuneObjective,
    val_loader: Iterable,
    device: torch.device,
    amp: bool,
    progress: bool,
) -> SupervisedEvaluator:
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=network,
        prepare_batch=objective.prepare_batch,
        key_val_metric={"val_loss": Loss(objective.loss, output_transform=from_engine([Keys.PRED, Keys.LABEL]))},
        metric_cmp_fn=lambda current, best: current < best,
        amp=amp,
        decollate=False,
    )
    if progress:
        ProgressBar(persist=False, desc="validate").attach(evaluator)
    return evaluator


def _clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> Callable[[Engine], None]:
    def clip(engine: SupervisedTrainer) -> None:
        clip_gradients(engine, parameters, max_norm)

    return clip


def _seed_epoch(seed: int) -> Callable[[Engine], None]:
    # Ignite builds each epoch's data iterator after EPOCH_STARTED, so the shuffle (and any torch RNG use)
    # of epoch e depends only on seed + e: a resumed run draws exactly what an uninterrupted one draws.
    def seed_now(engine: Engine) -> None:
        torch.manual_seed(seed + engine.state.epoch)

    return seed_now


# --------------------------------------------------------------------------- public entry point


def finetune(
    model: MedSAM,
    train_loader: Iterable,
    val_loader: Iterable | None,
    output_dir: str | os.PathLike,
    epochs: int = 20,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    patience: int = 5,
    amp: bool = False,
    device: torch.device | str | None = None,
    resume: bool = True,
    progress: bool = True,
    *,
    seed: int = 0,
    max_grad_norm: float = MAX_GRAD_NORM,
    restore_best: bool = True,
    trainable: Sequence[str] = ("image_encoder", "mask_decoder"),
    tensorboard_dir: str | os.PathLike | None = None,
    objective: FinetuneObjective | None = None,
) -> dict[str, Any]:
    """Fine-tune a (pruned) MedSAM on box-prompted batches and keep the best model by validation loss.

    Batches are dicts from :func:`medcore_monai.transforms.medsam_preprocess` collated by a MONAI
    ``DataLoader`` (``image``, ``label_lowres``, ``box``). Pruning masks attached with
    :func:`~medcore_monai.networks.attach_masks` stay enforced: they act on activations, so removed
    groups get exactly zero gradient (a slimmed model has nothing to enforce).

    Args:
        model: the network, trained in place (only the ``trainable`` modules; every ``requires_grad``
            flag is restored at the end).
        train_loader: training batches.
        val_loader: validation batches; ``None`` monitors the training loss instead.
        output_dir: where the checkpoints and ``history.json`` go.
        epochs: total number of epochs (including those of a resumed run).
        lr: AdamW learning rate of the first epoch; cosine-annealed per epoch to ``0.01 * lr``.
        weight_decay: AdamW (decoupled) weight decay.
        patience: stop after this many epochs without a lower monitored loss; 0 disables.
        amp: mixed precision with a gradient scaler, on CUDA only (ignored with a log line on CPU).
        device: default CUDA when available, else CPU.
        resume: continue from ``output_dir/checkpoint_latest.pth`` when present, at the next epoch;
            ``False`` starts over and replaces the files.
        progress: show Ignite progress bars.
        seed: epoch ``e`` starts with ``torch.manual_seed(seed + e)`` (data shuffling), which makes a
            resumed run identical to an uninterrupted one.
        max_grad_norm: gradient-norm clipping threshold (after unscaling under AMP).
        restore_best: load the best checkpoint's weights into ``model`` at the end.
        trainable: the submodules to train (the IoU head is always frozen). ``("mask_decoder",)`` is
            RobustMedSAM's decoder-only fine-tuning.
        tensorboard_dir: log the training loss per iteration and the epoch losses there.
        objective: network wrapper, batch layout and loss (default: the model, ``finetune_loss``).

    Returns:
        ``{"history", "best_checkpoint", "best_epoch", "best_loss", "latest_checkpoint", "stopped_early",
        "start_epoch", "epochs_completed"}``. ``history`` lists per epoch ``epoch``, ``train_loss`` (mean
        over iterations), ``val_loss`` (mean over samples; ``None`` without validation),
        ``monitored_loss`` and ``lr``. ``start_epoch`` is the first epoch this call ran
        (``epochs_completed + 1`` when there was nothing left to do).

    Raises:
        FloatingPointError: when a loss becomes NaN or infinite.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if patience < 0:
        raise ValueError(f"patience must be >= 0, got {patience}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = _resolve_device(device)
    amp = _use_amp(amp, device)
    with preserved_requires_grad(model):
        _freeze_outside(model, trainable)
        return _FinetuneRun(
            model,
            train_loader,
            val_loader,
            output_dir,
            epochs,
            lr,
            weight_decay,
            patience,
            amp,
            device,
            progress,
            objective or FinetuneObjective(),
        ).run(
            resume=resume,
            seed=seed,
            max_grad_norm=max_grad_norm,
            restore_best=restore_best,
            tensorboard_dir=tensorboard_dir,
        )


class _FinetuneRun:
    """The engines, handlers and checkpointed objects of one :func:`finetune` call."""

    def __init__(
        self,
        model: MedSAM,
        train_loader: Iterable,
        val_loader: Iterable | None,
        output_dir: Path,
        epochs: int,
        lr: float,
        weight_decay: float,
        patience: int,
        amp: bool,
        device: torch.device,
        progress: bool,
        objective: FinetuneObjective,
    ) -> None:
        self.model = model.to(device)
        network = (objective.network or model).to(device)
        self.output_dir = output_dir
        self.epochs = epochs
        self.patience = patience
        self.progress = progress
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("nothing to train: every parameter of the trainable modules is frozen")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.scheduler = _cosine_scheduler(self.optimizer, epochs)
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.record = _TrainingRecord()
        self.trainer = SupervisedTrainer(
            device=device,
            max_epochs=epochs,
            train_data_loader=train_loader,
            network=data_parallel(network, device),
            optimizer=self.optimizer,
            loss_function=objective.loss,
            prepare_batch=objective.prepare_batch,
            amp=amp,
            decollate=False,
        )
        self.evaluator = (
            _build_evaluator(network, objective, val_loader, device, amp, progress and is_main_process())
            if val_loader is not None
            else None
        )
        self.early_stopping = (
            EarlyStopping(patience, score_function=lambda _: -self.record.last_monitored, trainer=self.trainer)
            if patience > 0
            else None
        )
        self.start_epoch = 1

    @property
    def best_path(self) -> Path:
        """The best model (``save_sam`` format)."""
        return self.output_dir / BEST_CHECKPOINT

    @property
    def latest_path(self) -> Path:
        """The resumable training state."""
        return self.output_dir / LATEST_CHECKPOINT

    def _to_save(self) -> dict[str, Any]:
        objects: dict[str, Any] = {
            "network": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "trainer": self.trainer,
            "record": self.record,
        }
        if self.early_stopping is not None:
            objects["early_stopping"] = self.early_stopping
        if self.scaler is not None:
            objects["scaler"] = self.scaler
        return objects

    # ----------------------------------------------------------------- handlers

    def _attach_tensorboard(self, log_dir: str | os.PathLike) -> None:
        loss = lambda out: float(_loss_metric_value(out))  # noqa: E731
        attach_tensorboard(self.trainer, log_dir, "finetune", loss, epoch_log=True)
        if self.evaluator is not None:
            attach_tensorboard(self.evaluator, log_dir, "validation", epoch_log=True, epoch_of=self._trainer_epoch)

    def _trainer_epoch(self, _: int) -> int:
        return self.trainer.state.epoch

    def _attach_handlers(self, seed: int, max_grad_norm: float) -> None:
        # Ignite runs handlers of one event in the order of attachment; the order below is the contract:
        # train-loss average, validation, record (+ best model), schedule, early stopping, latest checkpoint.
        trainer = self.trainer
        trainer.add_event_handler(Events.STARTED, self._install_scaler)
        trainer.add_event_handler(Events.EPOCH_STARTED, _seed_epoch(seed))
        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, _clip_gradients(self.parameters, max_grad_norm))
        Average(output_transform=_loss_metric_value).attach(trainer, "train_loss")
        if self.evaluator is not None:
            ValidationHandler(interval=1, validator=self.evaluator, epoch_level=True).attach(trainer)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._record_epoch)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self.scheduler.step())
        if self.early_stopping is not None:
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self.early_stopping)
        latest = Checkpoint(
            self._to_save(), _AtomicSaver(self.output_dir), n_saved=1, filename_pattern=LATEST_CHECKPOINT
        )
        trainer.add_event_handler(Events.EPOCH_COMPLETED, latest)
        if self.progress and is_main_process():
            ProgressBar(persist=False, desc="finetune").attach(trainer, output_transform=_loss_metric_value)

    def _install_scaler(self, engine: SupervisedTrainer) -> None:
        # MONAI's Trainer.run() creates a fresh GradScaler; use the checkpointed one instead.
        if self.scaler is not None:
            engine.scaler = self.scaler

    def _record_epoch(self, engine: SupervisedTrainer) -> None:
        epoch = engine.state.epoch
        train_loss = float(engine.state.metrics["train_loss"])
        val_loss = float(self.evaluator.state.metrics["val_loss"]) if self.evaluator is not None else None
        monitored = train_loss if val_loss is None else val_loss
        if not (math.isfinite(train_loss) and math.isfinite(monitored)):
            raise FloatingPointError(f"non-finite loss at epoch {epoch}: train {train_loss}, validation {val_loss}")
        entry = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "monitored_loss": monitored,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        if self.record.add(entry) and is_main_process():
            save_sam(self.model, self.best_path, metadata={"epoch": epoch, "monitored_loss": monitored})
        if is_main_process():
            self._write_history()
        logger.info(
            "epoch %d/%d: train loss %.4f, validation loss %s, lr %.3g%s",
            epoch,
            self.epochs,
            train_loss,
            "n/a" if val_loss is None else f"{val_loss:.4f}",
            entry["lr"],
            " (best)" if self.record.best_epoch == epoch else "",
        )

    def _write_history(self) -> None:
        write_json_atomic(
            self.output_dir / HISTORY_FILE,
            {
                "epochs": self.record.history,
                "best_epoch": self.record.best_epoch,
                "best_loss": self.record.best_loss,
                "monitored": "val_loss" if self.evaluator is not None else "train_loss",
                "stopped_early": self._stopped_early(),
            },
        )

    def _stopped_early(self) -> bool:
        return self.early_stopping is not None and self.early_stopping.counter >= self.patience

    # ----------------------------------------------------------------- resume and run

    def _resume(self) -> None:
        state = read_checkpoint(self.latest_path)
        to_load = self._to_save()
        missing = sorted({"network", "optimizer", "scheduler", "trainer", "record"} - set(state))
        if missing:
            raise RuntimeError(f"{self.latest_path} lacks {missing}; pass resume=False to start over")
        # AMP or early stopping may be switched on or off between runs: restore what both sides have.
        Checkpoint.load_objects({k: v for k, v in to_load.items() if k in state}, state)
        _apply_schedule(self.scheduler)
        done = self.trainer.state.epoch
        # Ignite restarts a finished engine from scratch, so extend its horizon to this call's epochs.
        self.trainer.state.max_epochs = max(self.epochs, done)
        self.start_epoch = done + 1
        logger.info("resuming from %s after epoch %d of %d", self.latest_path, done, self.epochs)

    def _nothing_left(self) -> bool:
        return self.trainer.state.epoch >= self.epochs or self._stopped_early()

    def run(
        self, resume: bool, seed: int, max_grad_norm: float, restore_best: bool, tensorboard_dir=None
    ) -> dict[str, Any]:
        """Train (or resume) and return the summary described in :func:`finetune`."""
        found = resume and self.latest_path.is_file()
        synchronise()  # every process decides before any of them writes a newer checkpoint
        if found:
            self._resume()
        if self._nothing_left():
            logger.info(
                "nothing to do: %d epochs completed (stopped early: %s)",
                self.trainer.state.epoch,
                self._stopped_early(),
            )
        else:
            self._attach_handlers(seed, max_grad_norm)
            if tensorboard_dir is not None:
                self._attach_tensorboard(tensorboard_dir)
            self.trainer.run()
        synchronise()  # the main process wrote the best checkpoint that every process reads back
        if restore_best and self.best_path.is_file():
            load_state_dict_strict(self.model, read_model_state(self.best_path), str(self.best_path))
        return {
            "history": [dict(e) for e in self.record.history],
            "best_checkpoint": self.best_path if self.best_path.is_file() else None,
            "best_epoch": self.record.best_epoch,
            "best_loss": self.record.best_loss,
            "latest_checkpoint": self.latest_path,
            "stopped_early": self._stopped_early(),
            "start_epoch": self.start_epoch,
            "epochs_completed": len(self.record.history),
        }
