"""Short recovery training after each pruning step, as a MONAI ``SupervisedTrainer``.

The student's image encoder is trained (prompt encoder and mask decoder frozen) on the calibration
images with :func:`medcore_monai.losses.recovery_loss` against a teacher: the model as it was at the
start of the pruning run. Images are drawn with replacement, in proportion to their boundary
complexity, from an explicitly seeded generator; every call gets a fresh AdamW.

Under several processes (``torchrun``, ``idist.Parallel``) each process draws its own images (the
sampler's seed is offset by the rank) and the student runs wrapped in ``DistributedDataParallel``, so the
gradients of all processes are averaged and the replicas stay identical: the effective batch is
``batch_size x world size``. Ignite's ``Checkpoint`` writes from the main process only.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from ..handlers.tensorboard import attach_tensorboard
from ..losses.recovery import RecoveryLossWeights, boundary_complexity, recovery_loss
from .common import plain_tensor, prepare_medsam_batch, preserved_requires_grad
from .distributed import data_parallel, is_main_process, synchronise

__all__ = ["RecoveryConfig", "TeacherOutputs", "recover", "freeze_for_recovery"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryConfig:
    """Recovery hyper-parameters (MedCore defaults: 100 steps, AdamW lr 1e-5, no weight decay, batch 1)."""

    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 1
    seed: int = 0
    amp: bool = False
    loss: RecoveryLossWeights = field(default_factory=RecoveryLossWeights)

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"invalid recovery config: steps {self.steps}, batch {self.batch_size}, lr {self.lr}")


class TeacherOutputs:
    """Teacher image embeddings and logits for a batch.

    With ``cache=True`` the outputs of every calibration sample are computed once (their boxes are
    tight, hence fixed) and looked up by sample name, so recovery never runs the teacher again and
    the teacher model can be freed. Otherwise a frozen copy runs on the student's device.
    """

    def __init__(self, teacher: nn.Module, cache: bool = False) -> None:
        self.teacher = copy.deepcopy(teacher).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self._store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _run(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.teacher.parameters()).device
        embedding = self.teacher.encode(images.to(device))
        return embedding, self.teacher.decode(embedding, boxes.to(device))

    @torch.no_grad()
    def precompute(self, samples: Sequence[Mapping[str, Any]], device: torch.device | str) -> None:
        """Fill the cache for ``samples`` (preprocessed dicts with ``image``, ``box`` and a unique ``name``).

        Without caching the live teacher answers every call, so only its device is set.
        """
        self.teacher.to(device)
        if not self.cache:
            return
        for sample in samples:
            images = plain_tensor(sample["image"], device).float()[None]
            boxes = plain_tensor(sample["box"], device).float()[None]
            emb, logits = self._run(images, boxes)
            self._store[str(sample["name"])] = (emb[0], logits[0])
        self.teacher = None  # outputs are all cached; free the copy

    def __call__(self, names: Sequence[str], images: torch.Tensor, boxes: torch.Tensor):
        """Embeddings and logits for a batch, from the cache or the teacher model."""
        if self.cache:
            try:
                pairs = [self._store[str(n)] for n in names]
            except KeyError as err:
                raise KeyError(f"teacher cache has no entry for sample {err.args[0]!r}") from None
            return torch.stack([p[0] for p in pairs]).to(images.device), torch.stack([p[1] for p in pairs]).to(
                images.device
            )
        self.teacher.to(images.device)
        return self._run(images, boxes)


def freeze_for_recovery(model: nn.Module) -> list[nn.Parameter]:
    """Train the image encoder only; returns its parameters."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("image_encoder."))
    model.train()
    model.prompt_encoder.eval()
    model.mask_decoder.eval()
    return [p for p in model.image_encoder.parameters() if p.requires_grad]


def _sampler(samples: Sequence[Mapping[str, Any]], count: int, seed: int) -> WeightedRandomSampler:
    weights = torch.tensor([boundary_complexity(s["label_lowres"]) for s in samples], dtype=torch.double)
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples=count, replacement=True, generator=generator)


def _names(batch: Mapping[str, Any]) -> list[str]:
    names = batch["name"]
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


class _EncodeDecode(nn.Module):
    """Embeddings and logits in one ``forward``, so DDP sees (and synchronises) the whole training pass."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.model.encode(images)
        return embedding, self.model.decode(embedding, boxes)


def _iteration(network: nn.Module, teacher: TeacherOutputs, config: RecoveryConfig):
    def step(engine: SupervisedTrainer, batch: Mapping[str, Any]) -> dict[str, Any]:
        device = engine.state.device
        images, target_low, (boxes,), _ = prepare_medsam_batch(batch, device, engine.non_blocking)
        target_full = plain_tensor(batch["label"], device).float()
        teacher_emb, teacher_logits = teacher(_names(batch), images, boxes)
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
            embedding, logits = network(images, boxes)
        terms = recovery_loss(
            logits.float(), target_full, target_low, embedding.float(), teacher_emb, teacher_logits, config.loss
        )
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite recovery loss at iteration {engine.state.iteration}: {terms}")
        terms["loss"].backward()
        engine.optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        output = {Keys.IMAGE: images, Keys.LABEL: target_low, Keys.PRED: logits.detach(), Keys.LOSS: values["loss"]}
        return output | {f"loss_{k}": v for k, v in values.items() if k != "loss"}

    return step


def recover(
    model: nn.Module,
    teacher: TeacherOutputs,
    samples: Sequence[Mapping[str, Any]],
    config: RecoveryConfig = RecoveryConfig(),
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    description: str = "recovery",
    tensorboard_dir: str | Path | None = None,
    tensorboard_tag: str = "recovery",
) -> dict[str, Any]:
    """Run ``config.steps`` recovery iterations on ``model`` (a MedSAM module) in place.

    Only the image encoder trains; every parameter's ``requires_grad`` flag is restored afterwards.

    Args:
        model: student; pruning masks may be attached as hooks (removed groups then get no gradient).
        teacher: outputs of the run's initial model.
        samples: preprocessed calibration samples (``image``, ``label``, ``label_lowres``, ``box``, ``name``).
        config: steps, optimiser and loss weights.
        device: training device (default: the model's).
        checkpoint_dir: where Ignite's ``Checkpoint`` saves network, optimiser and trainer state when the
            run completes; if it holds a checkpoint of a previous call, that state is loaded and the
            remaining iterations run (resume).
        progress: show a progress bar.
        description: progress bar label.
        tensorboard_dir: log every loss term per iteration there (``<tensorboard_tag>/<term>``).
        tensorboard_tag: scalar name prefix.

    Returns:
        ``{"steps", "losses"}`` with the per-iteration total loss.
    """
    with preserved_requires_grad(model):
        return _run_recovery(
            model,
            teacher,
            samples,
            config,
            device,
            checkpoint_dir,
            progress=progress,
            description=description,
            tensorboard_dir=tensorboard_dir,
            tensorboard_tag=tensorboard_tag,
        )


def _run_recovery(
    model: nn.Module,
    teacher: TeacherOutputs,
    samples: Sequence[Mapping[str, Any]],
    config: RecoveryConfig,
    device: torch.device | str | None,
    checkpoint_dir: str | Path | None,
    progress: bool,
    description: str,
    tensorboard_dir: str | Path | None,
    tensorboard_tag: str,
) -> dict[str, Any]:
    if config.steps == 0:
        return {"steps": 0, "losses": []}
    if not samples:
        raise ValueError("recovery needs at least one calibration sample")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    params = freeze_for_recovery(model)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(
        list(samples),
        batch_size=config.batch_size,
        # each process draws its own images; DDP averages their gradients
        sampler=_sampler(samples, config.steps * config.batch_size, config.seed + idist.get_rank()),
    )
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=loader,
        network=model,
        optimizer=optimizer,
        loss_function=nn.Identity(),  # the iteration computes the recovery loss itself
        epoch_length=config.steps,
        prepare_batch=prepare_medsam_batch,
        iteration_update=_iteration(data_parallel(_EncodeDecode(model), device), teacher, config),
    )
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output[Keys.LOSS]))
    if checkpoint_dir is not None and _attach_checkpoint(trainer, model, optimizer, Path(checkpoint_dir)):
        model.eval()
        return {"steps": config.steps, "losses": [], "resumed_completed": True}
    if tensorboard_dir is not None:
        attach_tensorboard(trainer, tensorboard_dir, tensorboard_tag, _loss_terms)
    if progress and is_main_process():
        from ignite.handlers import ProgressBar

        ProgressBar(desc=description, persist=False).attach(trainer, output_transform=lambda out: out[Keys.LOSS])
    trainer.run()
    model.eval()
    return {"steps": config.steps, "losses": losses}


def _loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    return {"loss": output[Keys.LOSS]} | {k[len("loss_") :]: v for k, v in output.items() if k.startswith("loss_")}


def _attach_checkpoint(trainer: SupervisedTrainer, model: nn.Module, optimizer, folder: Path) -> bool:
    """Save state periodically and at the end; load an earlier state. Returns True if that run had completed."""
    objects = {"network": model, "optimizer": optimizer, "trainer": trainer}
    saver = DiskSaver(str(folder), require_empty=False, atomic=True)
    handler = Checkpoint(objects, saver, filename_prefix="recovery", n_saved=1)
    trainer.add_event_handler(Events.COMPLETED, handler)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=max(1, trainer.state.epoch_length // 4)), handler)
    existing = sorted(folder.glob("recovery_checkpoint_*.pt"))
    # no process may write a checkpoint before every process has looked for one, or they would resume
    # from different iterations (and DDP would hang or fail)
    synchronise()
    if existing:
        state = torch.load(existing[-1], map_location="cpu", weights_only=True)
        Checkpoint.load_objects(objects, state)
        logger.info("resumed recovery from %s at iteration %d", existing[-1], trainer.state.iteration)
        return trainer.state.iteration >= trainer.state.epoch_length
    return False
