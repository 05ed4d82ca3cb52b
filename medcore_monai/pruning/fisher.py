"""Boundary-aware diagonal Fisher of the image encoder, computed by an Ignite engine.

For every calibration sample n (tight box prompt, one sample at a time so the squares are of
per-sample gradients), ``F_i = (1/N) sum_n (dL_n / dtheta_i)^2`` with ``L`` the boundary-weighted
BCE + Dice of :func:`medcore_monai.losses.boundary_weighted_bce_dice`. Squares are accumulated in
fp32 on the model's device; samples with a non-finite loss or gradient are skipped and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import ignite.distributed as idist
import torch
from ignite.engine import Engine, EventEnum, Events
from torch import nn
from torch.utils.data import DataLoader

from ..losses import boundary_weighted_bce_dice
from ..networks.conv_groups import conv_group_sums, conv_structure
from ..networks.structure import encoder_structure, group_sums
from ..tensors import plain_tensor, preserved_requires_grad

__all__ = [
    "FisherAccumulator",
    "FisherCalibration",
    "FisherEvents",
    "FisherResult",
    "compute_fisher",
    "create_fisher_engine",
    "cross_fisher",
    "shard_for_process",
]

logger = logging.getLogger(__name__)


@dataclass
class FisherResult:
    """Diagonal Fisher per encoder parameter (names as in ``image_encoder.named_parameters()``)."""

    fisher: dict[str, torch.Tensor]
    used: int
    skipped: int
    taylor_heads: list[torch.Tensor] = field(default_factory=list)
    taylor_channels: list[torch.Tensor] = field(default_factory=list)
    taylor_convs: list[torch.Tensor] = field(default_factory=list)

    def to(self, device: torch.device | str) -> FisherResult:
        """Copy with every tensor on ``device``."""
        return FisherResult(
            fisher={k: v.to(device) for k, v in self.fisher.items()},
            used=self.used,
            skipped=self.skipped,
            taylor_heads=[t.to(device) for t in self.taylor_heads],
            taylor_channels=[t.to(device) for t in self.taylor_channels],
            taylor_convs=[t.to(device) for t in self.taylor_convs],
        )


class FisherAccumulator:
    """Ignite handler adding up squared per-sample gradients of the encoder parameters, on their device.

    ``attach`` it to an engine from :func:`create_fisher_engine`; the engine state then carries the
    running ``fisher_used`` / ``fisher_skipped`` counts (samples with a non-finite loss or gradient are
    skipped).

    With ``group_taylor=True`` it also accumulates the first-order Taylor importance of each head,
    MLP channel and MBConv hidden channel, ``(sum_{i in g} g_i theta_i)^2`` per sample (the grouped Taylor criterion of
    Molchanov et al.), used by the ``taylor`` baseline.
    """

    def __init__(self, encoder: nn.Module, group_taylor: bool = False) -> None:
        self.encoder = encoder
        # the engine unfreezes the whole encoder at start, so every encoder parameter is tracked
        self.params = dict(encoder.named_parameters())
        self.group_taylor = group_taylor
        self.reset()

    def attach(self, engine: Engine) -> FisherAccumulator:
        """Reset when the engine starts, fold in every sample's gradients, log the counts at the end."""
        engine.add_event_handler(Events.STARTED, lambda _: self.reset())
        engine.add_event_handler(FisherEvents.SAMPLE_BACKWARD_COMPLETED, self._on_sample)
        engine.add_event_handler(Events.COMPLETED, self._log_counts)
        return self

    def _on_sample(self, engine: Engine) -> None:
        if math.isfinite(engine.state.sample_loss):
            self.add_current_gradients()
        else:
            self.skipped += 1
        engine.state.fisher_used, engine.state.fisher_skipped = self.used, self.skipped

    def _log_counts(self, _: Engine) -> None:
        logger.info("Fisher calibration: %d samples used, %d skipped", self.used, self.skipped)

    def reset(self) -> None:
        """Zero the sums and counts."""
        self.sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.used = 0
        self.skipped = 0
        self.taylor_heads: list[torch.Tensor] = []
        self.taylor_channels: list[torch.Tensor] = []
        self.taylor_convs: list[torch.Tensor] = []

    def add_current_gradients(self) -> bool:
        """Fold the gradients now stored on the parameters in; return False if they were skipped."""
        grads = {n: p.grad for n, p in self.params.items()}
        missing = [n for n, g in grads.items() if g is None]
        if len(missing) == len(grads):
            raise RuntimeError("no gradient reached the image encoder; is it frozen or detached?")
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads.values())
        if not finite:
            self.skipped += 1
            return False
        with torch.no_grad():
            for name, grad in grads.items():
                if grad is not None:
                    self.sums[name].addcmul_(grad.float(), grad.float())
            if self.group_taylor:
                self._add_taylor(grads)
        self.used += 1
        return True

    def _add_taylor(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        products = {
            n: (g.float() * self.params[n].detach().float()) if g is not None else torch.zeros_like(self.sums[n])
            for n, g in grads.items()
        }
        heads, channels = group_sums(products, encoder_structure(self.encoder))
        convs = conv_group_sums(products, conv_structure(self.encoder))
        if not self.taylor_heads:
            self.taylor_heads = [h.square() for h in heads]
            self.taylor_channels = [c.square() for c in channels]
            self.taylor_convs = [c.square() for c in convs]
        else:
            accumulated = self.taylor_heads + self.taylor_channels + self.taylor_convs
            for acc, value in zip(accumulated, heads + channels + convs):
                acc.add_(value.square())

    def _sum_over_processes(self) -> None:
        # Under torchrun / idist each process saw its own shard; add sums and counts of all of them.
        if idist.get_world_size() == 1:
            return
        counts = idist.all_reduce(torch.tensor([self.used, self.skipped], dtype=torch.float64, device=idist.device()))
        self.used, self.skipped = int(counts[0]), int(counts[1])
        for name in self.sums:
            self.sums[name] = idist.all_reduce(self.sums[name])
        self.taylor_heads = [idist.all_reduce(t) for t in self.taylor_heads]
        self.taylor_channels = [idist.all_reduce(t) for t in self.taylor_channels]
        self.taylor_convs = [idist.all_reduce(t) for t in self.taylor_convs]

    def result(self) -> FisherResult:
        """Mean over accepted samples (of every process when running distributed).

        Raises:
            RuntimeError: if every sample was skipped.
        """
        self._sum_over_processes()
        if self.used == 0:
            raise RuntimeError(f"Fisher calibration accepted no sample ({self.skipped} skipped as non-finite)")
        return FisherResult(
            fisher={n: s / self.used for n, s in self.sums.items()},
            used=self.used,
            skipped=self.skipped,
            taylor_heads=[t / self.used for t in self.taylor_heads],
            taylor_channels=[t / self.used for t in self.taylor_channels],
            taylor_convs=[t / self.used for t in self.taylor_convs],
        )


def _freeze_all_but_encoder(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("image_encoder."))


class FisherEvents(EventEnum):
    """Per-sample events fired inside a calibration iteration."""

    SAMPLE_BACKWARD_COMPLETED = "sample_backward_completed"


def create_fisher_engine(
    model: nn.Module,
    device: torch.device | str | None = None,
    boundary_weight: float = 3.0,
    reduction: str = "mean",
) -> Engine:
    """An Ignite engine that runs one backward pass per calibration sample.

    Batches are dicts with ``image`` ``[B, 3, S, S]``, ``label_lowres`` ``[B, 1, s, s]`` and ``box``
    ``[B, 4]``. Each sample of a batch gets its own forward/backward (that is what makes Fisher
    squares per-sample) followed by :attr:`FisherEvents.SAMPLE_BACKWARD_COMPLETED`, with the sample's
    loss in ``engine.state.sample_loss`` and its gradients on the parameters; a
    :class:`FisherAccumulator` attached to the engine adds them up. ``engine.state.output`` is the
    batch's mean loss.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device

    def process(engine: Engine, batch: Mapping[str, torch.Tensor]) -> float:
        images = plain_tensor(batch["image"], device, non_blocking=True).float()
        targets = plain_tensor(batch["label_lowres"], device, non_blocking=True).float()
        boxes = plain_tensor(batch["box"], device).float()
        losses = []
        for i in range(images.shape[0]):
            model.zero_grad(set_to_none=True)
            logits = model(images[i : i + 1], boxes[i : i + 1])
            loss = boundary_weighted_bce_dice(logits, targets[i : i + 1], boundary_weight, reduction=reduction)
            if torch.isfinite(loss):
                loss.backward()
            engine.state.sample_loss = float(loss.detach())
            engine.fire_event(FisherEvents.SAMPLE_BACKWARD_COMPLETED)
            losses.append(engine.state.sample_loss)
        finite = [v for v in losses if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else float("nan")

    engine = Engine(process)
    engine.register_events(*FisherEvents)

    @engine.on(Events.STARTED)
    def _prepare(_: Engine) -> None:
        model.eval()
        _freeze_all_but_encoder(model)

    @engine.on(Events.COMPLETED)
    def _release_gradients(_: Engine) -> None:
        model.zero_grad(set_to_none=True)

    return engine


def compute_fisher(
    model: nn.Module,
    data: Iterable[Mapping[str, torch.Tensor]],
    device: torch.device | str | None = None,
    boundary_weight: float = 3.0,
    reduction: str = "mean",
    group_taylor: bool = False,
    progress: bool = True,
    description: str = "Fisher",
) -> FisherResult:
    """Boundary-aware diagonal Fisher of ``model.image_encoder`` over ``data`` (one pass).

    Args:
        model: a :class:`~medcore_monai.networks.MedSAM` (masks may be attached; removed groups get 0).
        data: iterable of batches (see :func:`create_fisher_engine`); when running distributed (torchrun,
            ``ignite.distributed``) each process passes its own shard (e.g. :func:`shard_for_process`)
            and the result is the mean over all of them.
        device: where to compute and accumulate (default: the model's device).
        boundary_weight: lambda_B of the loss.
        reduction: loss reduction over pixels (``mean`` default, ``sum`` as in the reference code).
        group_taylor: also accumulate grouped first-order Taylor scores.
        progress: show an Ignite progress bar.
        description: progress bar label.
    """
    with preserved_requires_grad(model):
        engine = create_fisher_engine(model, device, boundary_weight, reduction)
        accumulator = FisherAccumulator(model.image_encoder, group_taylor=group_taylor).attach(engine)
        if progress:
            from ignite.handlers import ProgressBar

            ProgressBar(desc=description, persist=False).attach(engine, output_transform=lambda loss: {"loss": loss})
        engine.run(data, max_epochs=1)
        return accumulator.result()


def shard_for_process(samples: list) -> list:
    """Share of ``samples`` for the current process (every world-size-th item); all of them when not distributed."""
    return samples[idist.get_rank() :: idist.get_world_size()]


def cross_fisher(
    fisher_medsam: Mapping[str, torch.Tensor], fisher_sam: Mapping[str, torch.Tensor], eps: float = 1e-30
) -> dict[str, torch.Tensor]:
    """Element-wise ``sqrt(F^M * F^S + eps)``; parameters SAM lacks count as ``F^S = 0``."""
    return {
        name: torch.sqrt(fm * fisher_sam[name].to(fm.device) + eps) if name in fisher_sam else torch.sqrt(fm * 0 + eps)
        for name, fm in fisher_medsam.items()
    }


@dataclass
class FisherCalibration:
    """The cascade's calibration as one config component: boundary-aware Fisher of a model on samples.

    ``PruningHandler`` runs it (per dataset, then on the SAM reference) the way ``ValidationHandler`` runs an
    evaluator: each call builds the Ignite engine of :func:`create_fisher_engine` with a :class:`FisherAccumulator`.
    Under several processes each one calibrates its share of the samples and the sums are added.

    Attributes:
        boundary_weight: lambda_B of the boundary-weighted calibration loss.
        reduction: loss reduction over pixels (``mean``; ``sum`` as in the reference code).
        progress: progress bars.
    """

    boundary_weight: float = 3.0
    reduction: str = "mean"
    progress: bool = True

    def __call__(
        self,
        model: nn.Module,
        samples: Iterable[Mapping[str, torch.Tensor]],
        device: torch.device | str | None = None,
        group_taylor: bool = False,
        description: str = "Fisher",
    ) -> FisherResult:
        """Fisher of ``model.image_encoder`` over this process's share of ``samples`` (batch 1)."""
        loader = DataLoader(shard_for_process(list(samples)), batch_size=1, shuffle=False)
        return compute_fisher(
            model, loader, device, self.boundary_weight, self.reduction, group_taylor, self.progress, description
        )
