"""Recovery training after each pruning step, as a MONAI ``SupervisedTrainer`` subclass.

The student's image encoder is trained (prompt encoder and mask decoder frozen) on the calibration images with
:func:`medcore_monai.losses.recovery_loss` against a teacher: the model as it was when the pruning run started,
whose outputs are cached once. Images are drawn with replacement, in proportion to their boundary complexity, by a
sampler seeded per epoch (and per rank), so a run resumed in the middle of an epoch draws what an uninterrupted
one draws. :class:`RecoveryTrainer` overrides only ``_iteration``, as the model zoo's custom trainers do; one
epoch is one cascade stage.

Under several processes (``torchrun``) each process draws its own images (the sampler's seed is offset by the
rank) and the student runs wrapped in ``DistributedDataParallel``, so gradients are averaged across processes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import ignite.distributed as idist
import torch
from ignite.engine import Events
from monai.engines import IterationEvents, SupervisedTrainer
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..losses.recovery import RecoveryLossWeights, boundary_complexity, recovery_loss
from ..networks.taps import captured_outputs, distillation_taps
from ..pruning.cascade import RecoveryConfig
from .common import plain_tensor, prepare_medsam_batch
from .distributed import data_parallel

__all__ = [
    "RecoveryConfig",
    "RecoverySampler",
    "RecoveryTrainer",
    "TeacherBatch",
    "TeacherOutputs",
    "recovery_taps",
    "freeze_for_recovery",
    "reestimate_batchnorm",
    "loss_terms",
    "recovery_loader",
]

logger = logging.getLogger(__name__)


class TeacherBatch(NamedTuple):
    """The teacher's outputs for a batch: image embeddings, low-resolution logits and intermediate taps."""

    embedding: torch.Tensor
    logits: torch.Tensor
    taps: tuple[torch.Tensor, ...] = ()


class TeacherOutputs:
    """Teacher image embeddings, logits and (when ``taps`` are named) intermediate encoder outputs for a batch.

    With ``cache=True`` the outputs of every calibration sample are computed once (their boxes are tight, hence
    fixed) and looked up by sample name, so recovery never runs the teacher again and the teacher model is freed;
    intermediate outputs are cached in bfloat16 (they are large: about 10 MB per image for LiteMedSAM's four
    stages). Otherwise a frozen copy runs on the student's device.

    Args:
        teacher: the dense model (a MedSAM).
        cache: compute every sample's outputs once (:meth:`precompute`).
        taps: module paths inside the image encoder whose outputs are also returned
            (:func:`~medcore_monai.networks.taps.distillation_taps`); empty: none.
    """

    def __init__(self, teacher: nn.Module, cache: bool = False, taps: Sequence[str] = ()) -> None:
        self.teacher = copy.deepcopy(getattr(teacher, "module", teacher)).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cache = cache
        self.taps = tuple(taps)
        self._store: dict[str, TeacherBatch] = {}

    @torch.no_grad()
    def _run(self, images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        device = next(self.teacher.parameters()).device
        with captured_outputs(self.teacher.image_encoder, self.taps) as taps:
            embedding = self.teacher.encode(images.to(device))
        return TeacherBatch(embedding, self.teacher.decode(embedding, boxes.to(device)), tuple(taps))

    @torch.no_grad()
    def precompute(self, samples: Sequence[Mapping[str, Any]], device: torch.device | str) -> TeacherOutputs:
        """Fill the cache for ``samples`` (``image``, ``box`` and a unique ``name``); returns ``self``."""
        self.teacher.to(device)
        if not self.cache:
            return self
        for sample in samples:
            images = plain_tensor(sample["image"], device).float()[None]
            boxes = plain_tensor(sample["box"], device).float()[None]
            out = self._run(images, boxes)
            taps = tuple(t[0].to(torch.bfloat16) for t in out.taps)
            self._store[str(sample["name"])] = TeacherBatch(out.embedding[0], out.logits[0], taps)
        self.teacher = None  # outputs are all cached; free the copy
        return self

    def __call__(self, names: Sequence[str], images: torch.Tensor, boxes: torch.Tensor) -> TeacherBatch:
        """Embeddings, logits and taps for a batch, from the cache or the teacher model."""
        if not self.cache:
            self.teacher.to(images.device)
            return self._run(images, boxes)
        try:
            entries = [self._store[str(n)] for n in names]
        except KeyError as err:
            raise KeyError(f"teacher cache has no entry for sample {err.args[0]!r}") from None
        device = images.device
        taps = tuple(torch.stack([e.taps[i] for e in entries]).to(device).float() for i in range(len(self.taps)))
        return TeacherBatch(
            torch.stack([e.embedding for e in entries]).to(device),
            torch.stack([e.logits for e in entries]).to(device),
            taps,
        )


def recovery_taps(model: nn.Module, weights: RecoveryLossWeights) -> list[str]:
    """The encoder taps a teacher must record for ``weights``: all when the intermediate term is on, else none."""
    encoder = getattr(model, "module", model).image_encoder
    return distillation_taps(encoder) if weights.intermediate > 0 else []


def freeze_for_recovery(model: nn.Module) -> list[nn.Parameter]:
    """Train the image encoder only (prompt encoder and decoder frozen, in eval mode); returns its parameters.

    BatchNorm layers (LiteMedSAM's TinyViT has 27) stay in eval mode: recovery runs a few steps at batch 1 on a
    pretrained model, where batch statistics of single images would replace the running statistics the model was
    trained with (measured on the dense LiteMedSAM, 40 steps: BF1 0.540 with them updated against 0.844 kept at
    lr 1e-5, 0.639 against 0.754 at lr 1e-4; ``docs/benchmarks.md``). Their weights and biases still train.
    """
    model = getattr(model, "module", model)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("image_encoder."))
    model.train()
    model.prompt_encoder.eval()
    model.mask_decoder.eval()
    for layer in _batchnorm_layers(model.image_encoder):
        layer.eval()
    return [p for p in model.image_encoder.parameters() if p.requires_grad]


def _batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, samples: Sequence[Mapping[str, Any]], device: torch.device | str, batch_size: int = 8
) -> int:
    """Recompute the image encoder's BatchNorm running statistics over ``samples``; returns the layers reset.

    After a pruning step the BatchNorm layers behind the pruned blocks see activations the removed groups no longer
    feed. Their statistics are re-estimated for the pruned network as the equal-weight average over batches of
    ``batch_size`` samples (momentum ``None``), with every other module in eval mode; recovery then keeps them
    (:func:`freeze_for_recovery`). An encoder without BatchNorm (SAM's ViT) is left as it is.
    """
    model = getattr(model, "module", model)
    layers = _batchnorm_layers(model.image_encoder)
    if not layers or not samples:
        return 0
    was_training, momenta = model.training, [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            model.encode(torch.stack([plain_tensor(s["image"], device).float() for s in chunk]))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
        for layer in layers:
            layer.eval()
    return len(layers)


class RecoverySampler(Sampler[int]):
    """Boundary-complexity-weighted draws with replacement, seeded by ``seed``, the rank and the epoch.

    ``set_epoch`` selects the epoch's draws and ``start`` skips those an interrupted run already used, so a
    resumed run continues with exactly the images an uninterrupted one would have drawn.
    """

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw epoch ``epoch``'s indices, skipping the first ``start``."""
        self.epoch, self.start = int(epoch), int(start)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + idist.get_rank() + 7919 * self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        start, self.start = self.start, 0
        return iter(draws[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples


def recovery_loader(samples: Sequence[Mapping[str, Any]], steps: int, batch_size: int, seed: int) -> DataLoader:
    """Calibration samples drawn ``steps x batch_size`` times per epoch by a :class:`RecoverySampler`."""
    if not samples:
        raise ValueError("recovery needs at least one calibration sample")
    weights = torch.tensor([boundary_complexity(s["label_lowres"]) for s in samples], dtype=torch.double)
    sampler = RecoverySampler(weights, max(1, steps) * batch_size, seed)
    return DataLoader(list(samples), batch_size=batch_size, sampler=sampler)


def _names(batch: Mapping[str, Any]) -> list[str]:
    names = batch["name"]
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


class RecoveryTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose iteration distils the pruned encoder towards the cached teacher.

    Args:
        device: training device.
        max_epochs: number of cascade stages (one epoch each).
        train_data_loader: calibration batches, e.g. from :func:`recovery_loader`.
        network: the MedSAM being pruned; wrapped in DDP here under several processes (after freezing everything
            but the encoder). Pruning handlers slim it between epochs and call :meth:`rebuild_optimizer`.
        optimizer: an optimizer, or a factory ``optimizer(params)`` (a bundle component with ``_mode_: callable``)
            that is given the encoder's parameters, here and again whenever a handler slims the network.
        teacher: the dense model's outputs (:class:`TeacherOutputs`).
        loss_weights: weights of the recovery loss terms.
        epoch_length: recovery steps per stage.
        skip_updates: prune without recovery (each stage is one idle iteration).
        kwargs: other ``SupervisedTrainer`` arguments (``train_handlers``, ``amp``, ...).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer],
        teacher: TeacherOutputs,
        loss_weights: RecoveryLossWeights | None = None,
        epoch_length: int | None = None,
        skip_updates: bool = False,
        **kwargs: Any,
    ) -> None:
        model = getattr(network, "module", network)
        # the caller's flags, before anything is frozen: restored when the run ends
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        params = freeze_for_recovery(model)
        # DDP must be built after freezing, or it waits for gradients of the frozen decoder
        network = data_parallel(model, torch.device(device))
        self.optimizer_factory = None if isinstance(optimizer, torch.optim.Optimizer) else optimizer
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        # set before MONAI attaches the handlers: a resuming checkpoint handler restores them on attach
        self.teacher = teacher
        self.loss_weights = loss_weights or RecoveryLossWeights()
        if self.loss_weights.intermediate > 0 and not teacher.taps:
            raise ValueError(
                "intermediate distillation (loss weight intermediate > 0) needs a teacher that records the encoder's "
                "taps: TeacherOutputs(model, taps=recovery_taps(model, loss_weights))"
            )
        self.losses: dict[int, list[float]] = {}
        self.skip_updates = skip_updates  # epochs only carry the handlers' stage events (pruning without recovery)
        kwargs.setdefault("prepare_batch", prepare_medsam_batch)
        kwargs.setdefault("decollate", False)
        super().__init__(
            device=torch.device(device),
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=nn.Identity(),  # the iteration computes the recovery loss itself
            epoch_length=epoch_length,
            **kwargs,
        )
        self.seconds: dict[int, float] = {}  # training time per epoch (stage), handlers excluded
        self.add_event_handler(Events.STARTED, self._freeze)
        self.add_event_handler(Events.EPOCH_STARTED, self._set_sampler_epoch)
        self.add_event_handler(Events.COMPLETED, self._restore_flags)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._record_epoch_time)
        self.add_event_handler(Events.EXCEPTION_RAISED, self._restore_flags_and_raise)

    @property
    def model(self) -> nn.Module:
        """The MedSAM being trained, without a DDP wrapper."""
        return getattr(self.network, "module", self.network)

    def rebuild_optimizer(self) -> None:
        """After slimming: re-wrap DDP around the model and give it a fresh optimizer from the factory."""
        params = freeze_for_recovery(self.model)
        self.network = data_parallel(self.model, self.state.device)
        if self.optimizer_factory is not None:
            self.optimizer = self.optimizer_factory(params)

    def _freeze(self, _: Any) -> None:
        freeze_for_recovery(self.network)

    def _restore_flags(self, _: Any) -> None:
        # the caller's model comes back as it went in, or a later fine-tuning finds its decoder frozen
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self.model.eval()

    def _restore_flags_and_raise(self, engine: Any, error: Exception) -> None:
        self._restore_flags(engine)
        raise error

    def _record_epoch_time(self, engine: Any) -> None:
        # Ignite's epoch time excludes the EPOCH_COMPLETED handlers (stage evaluation), as intended here
        self.seconds[engine.state.epoch] = float(engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0)

    def _set_sampler_epoch(self, engine: Any) -> None:
        sampler = getattr(self.data_loader, "sampler", None)
        if isinstance(sampler, RecoverySampler):
            done = engine.state.iteration % engine.state.epoch_length if engine.state.epoch_length else 0
            sampler.set_epoch(engine.state.epoch, start=done * (self.data_loader.batch_size or 1))

    def _iteration(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        if self.skip_updates:
            return {}
        device = engine.state.device
        images, target_low, (boxes,), _ = engine.prepare_batch(batchdata, device, engine.non_blocking)
        target_full = plain_tensor(batchdata["label"], device).float()
        teacher = self.teacher(_names(batchdata), images, boxes)
        engine.optimizer.zero_grad(set_to_none=True)
        with (
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=engine.amp and device.type == "cuda"),
            captured_outputs(self.model.image_encoder, self.teacher.taps) as student_taps,
        ):
            embedding, logits = engine.network(images, boxes, return_embeddings=True)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        terms = recovery_loss(
            logits.float(),
            target_full,
            target_low,
            embedding.float(),
            teacher.embedding,
            teacher.logits,
            self.loss_weights,
            student_taps=[t.float() for t in student_taps],
            teacher_taps=teacher.taps,
        )
        if not torch.isfinite(terms["loss"]):
            raise FloatingPointError(f"non-finite recovery loss at iteration {engine.state.iteration}: {terms}")
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: target_low, Keys.PRED: logits.detach()}
        engine.state.output[Keys.LOSS] = terms["loss"]
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        terms["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        values = {k: float(v.detach()) for k, v in terms.items()}
        engine.state.output.update(
            {Keys.LOSS: values["loss"]} | {f"loss_{k}": v for k, v in values.items() if k != "loss"}
        )
        self.losses.setdefault(engine.state.epoch, []).append(values["loss"])
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def loss_terms(output: Mapping[str, Any]) -> dict[str, float]:
    """Every recovery loss term of an iteration output, named ``recovery/<term>`` (for TensorBoard)."""
    if not output:
        return {}
    terms = {"recovery/loss": output[Keys.LOSS]}
    return terms | {f"recovery/{k[len('loss_') :]}": v for k, v in output.items() if k.startswith("loss_")}
