"""What the ``finetune`` overlay (bundle/configs/finetune.yaml) adds to train.yaml: resume, robustness variants.

train.yaml already trains a (pruned) MedSAM with box prompts; the overlay only needs a few pieces MONAI lacks:

* resume: :class:`ResumableStates` registers the LR scheduler, the early-stopping counter and the best-model
  tracker with :class:`~medcore_monai.handlers.TrainingCheckpoint` (which saves the model, optimizer, counters and
  RNG states itself), and :class:`EpochSeeding` reseeds the random training transforms at every epoch start, so a
  resumed run draws exactly what an uninterrupted one draws;
* corrupted images: :func:`corruption_transforms` (a random corruption and severity per training sample) and
  :func:`validation_corruptions` (a fixed draw per sample name, for the evaluator's model-size transform);
* the network: :func:`load_for_finetuning` loads the checkpoint, SVD-adapts its encoder when asked and freezes what
  is not trained, all before ``network`` wraps it (``DistributedDataParallel`` only syncs what is trainable when
  it is built, so freezing later fails under ``torchrun``);
* SVD adaptation: :class:`PlainWeights` so the best model is saved
  as plain weights under the stock key names, :func:`merge_svd` when training ends;
* :func:`check_finetune_options`: the combinations that cannot work fail before any work.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver, EarlyStopHandler
from monai.transforms import Randomizable
from torch import nn

from ..config import ConfigError
from ..engines.parameters import trainable_parameters
from ..networks.build import load_medsam
from ..networks.checkpoint import plain_state_dict
from ..networks.medsam import MedSAM, RobustMedSAM
from ..robust.svd import apply_svd_adaptation, is_svd_adapted, merge_svd_adaptation, svd_parameter_count
from ..transforms.corruptions import RandCorruptiond, corruption_seed
from .checkpointing import register_state, resumed_state
from .robustness import corruption_grid

__all__ = [
    "EpochSeeding",
    "NamedCorruptiond",
    "PlainWeights",
    "ResumableStates",
    "check_finetune_options",
    "corruption_transforms",
    "load_for_finetuning",
    "merge_svd",
    "validation_corruptions",
    "with_svd",
]

logger = logging.getLogger(__name__)

# any valid corruption and severity: corruption_seed validates both, the draw itself only needs a stable hash
_SEED_SALT = ("gauss_noise", 1)


def _model(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)  # DistributedDataParallel (and CleanDegradedPair) keep it here


# --------------------------------------------------------------------------- checks


def check_finetune_options(
    network: nn.Module,
    trainable_modules: Sequence[str],
    corruptions: Sequence[str] | str | None,
    severities: Sequence[int],
    svd_adaptation: bool,
    consistency_loss: bool,
) -> list[tuple[str, int]]:
    """Refuse option combinations that cannot train, before any data is read.

    Args:
        network: the model to fine-tune (``network_def``: its decoder type is all that is checked).
        trainable_modules: submodules to train.
        corruptions: ``None``, ``"all"`` or corruption names.
        severities: corruption severities.
        svd_adaptation: whether the encoder trains through its singular values.
        consistency_loss: whether RobustSAM's clean-vs-degraded loss is used.

    Returns:
        The ``(corruption, severity)`` pairs training draws from (empty without corruptions).

    Raises:
        ConfigError: listing every problem.
    """
    problems = []
    try:
        grid = corruption_grid(corruptions, severities)
    except ValueError as error:
        grid = []
        problems.append(str(error))
    if svd_adaptation and "image_encoder" not in trainable_modules:
        problems.append("svd_adaptation trains the image encoder: add image_encoder to trainable_modules")
    if consistency_loss and not corruptions:
        problems.append("consistency_loss compares clean and corrupted views: set corruptions")
    if consistency_loss and not isinstance(_model(network), RobustMedSAM):
        problems.append("consistency_loss needs a RobustSAM decoder (a fused model); this checkpoint has a plain one")
    if problems:
        raise ConfigError("cannot fine-tune:\n  " + "\n  ".join(problems))
    return grid


# --------------------------------------------------------------------------- corrupted images


def _axes(corruptions: Sequence[str] | str | None, severities: Sequence[int]) -> tuple[list[str], list[int]]:
    grid = corruption_grid(corruptions, severities)
    return sorted({n for n, _ in grid}), sorted({s for _, s in grid})


def corruption_transforms(
    corruptions: Sequence[str] | str | None,
    severities: Sequence[int],
    seed: int,
    clean_key: str | None = None,
) -> list[RandCorruptiond]:
    """The training transforms to append after the random box: one random corruption per sample, or none.

    Args:
        corruptions: ``None`` (no transform), ``"all"`` or corruption names.
        severities: severities to draw from.
        seed: seed of the draw (an :class:`EpochSeeding` handler reseeds it per epoch).
        clean_key: also keep the clean image under this key (RobustSAM's consistency loss).

    Raises:
        ValueError: for unknown corruptions or severities.
    """
    if not corruptions:
        return []
    names, levels = _axes(corruptions, severities)
    draw = RandCorruptiond(keys="image", names=names, severities=levels, clean_key=clean_key)
    return [draw.set_random_state(seed=seed)]


class NamedCorruptiond(RandCorruptiond):
    """:class:`RandCorruptiond` whose draw for an item depends only on ``seed`` and the item's name.

    A validation set degraded this way is the same on every run and every validation, whatever the order, the
    batching or the number of processes.

    Args:
        keys: image keys.
        names: corruptions to draw from.
        severities: severities to draw from.
        seed: experiment seed.
        name_key: key of the item's name.
        kwargs: other :class:`RandCorruptiond` arguments.
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable],
        names: Sequence[str],
        severities: Sequence[int],
        seed: int = 0,
        name_key: str = "name",
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, names=list(names), severities=list(severities), **kwargs)
        self.seed, self.name_key = int(seed), name_key

    def set_random_state(self, seed: int | None = None, state: Any = None) -> NamedCorruptiond:
        """Ignored (``Compose`` reseeds its members): the draw is fixed by the item's name."""
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Degrade ``data`` by the draw of its name."""
        if data.get(self.name_key) is None:
            raise KeyError(f"a fixed corruption per sample needs the sample's {self.name_key!r}")
        item_seed = corruption_seed(self.seed, *_SEED_SALT, str(data[self.name_key]))
        super().set_random_state(seed=item_seed)
        return super().__call__(data)


def validation_corruptions(
    corruptions: Sequence[str] | str | None, severities: Sequence[int], seed: int
) -> list[NamedCorruptiond]:
    """The step to append to the evaluator's model-size transform: a fixed draw per sample name, or none."""
    if not corruptions:
        return []
    names, levels = _axes(corruptions, severities)
    return [NamedCorruptiond(keys="image", names=names, severities=levels, seed=seed)]


# --------------------------------------------------------------------------- network and SVD adaptation


def load_for_finetuning(
    checkpoint: str,
    pixel_normalize: bool = False,
    model_type: str = "auto",
    trainable_modules: Sequence[str] = ("image_encoder", "mask_decoder"),
    svd_adaptation: bool = False,
    svd_include_convs: bool = False,
) -> MedSAM:
    """:func:`~medcore_monai.networks.load_medsam`, SVD-adapted when asked, frozen outside ``trainable_modules``.

    Meant as the ``network_def`` of a fine-tuning run: everything that changes which parameters train happens
    here, before any ``DistributedDataParallel`` wrapping.

    Args:
        checkpoint: any file :func:`~medcore_monai.networks.load_sam` reads (compact widths are kept).
        pixel_normalize: see :class:`~medcore_monai.networks.MedSAM`.
        model_type: see :func:`~medcore_monai.networks.load_sam`.
        trainable_modules: submodules to train (the IoU head never trains).
        svd_adaptation: train the image encoder through its singular values only.
        svd_include_convs: also adapt the encoder's convolutions.

    Raises:
        ValueError: for unknown trainable modules, or when nothing is left to train.
    """
    model = load_medsam(checkpoint, pixel_normalize=pixel_normalize, model_type=model_type)
    with_svd(model, svd_adaptation, svd_include_convs)
    trainable_parameters(model, list(trainable_modules))
    return model


def with_svd(network: nn.Module, enabled: bool, include_convs: bool = False) -> nn.Module:
    """``network`` with its image encoder SVD-adapted when ``enabled`` (in place; returns ``network``).

    Call it before the optimizer is built (and before any DDP wrapping): only the singular-value scales and shifts
    of the encoder stay trainable.
    """
    if enabled:
        encoder = _model(network).image_encoder
        adapted = apply_svd_adaptation(encoder, include_convs=include_convs)
        count = svd_parameter_count(encoder)
        logger.info("SVD adaptation of %d encoder layers: %d trainable values", len(adapted), count)
    return network


def merge_svd(network: nn.Module) -> int:
    """Bake an SVD adaptation into plain weights (stock keys, all flags restored); returns the merged layers."""
    return merge_svd_adaptation(_model(network))


class PlainWeights:
    """A network's weights for a checkpoint handler, parametrizations (SVD adaptation) baked in.

    ``CheckpointSaver`` saves ``state_dict()`` of what it is given; with this the best model holds the effective
    weights under the stock key names, so it loads into an unadapted model.

    Args:
        network: the trained network, maybe DDP-wrapped (unwrapped at each call).
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain weights of the network as it is now."""
        return plain_state_dict(_model(self.network))

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load plain weights (strictly) into an unadapted network."""
        model = _model(self.network)
        if is_svd_adapted(model):
            raise RuntimeError("merge the SVD adaptation (merge_svd) before loading plain weights")
        model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- resume


class _EarlyStopState:
    """The counter and best score of an ``EarlyStopHandler`` (its Ignite handler exists once it is bound)."""

    def __init__(self, handler: EarlyStopHandler) -> None:
        self.handler = handler

    def state_dict(self) -> dict[str, Any]:
        inner = self.handler._handler
        return {} if inner is None else dict(inner.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        inner = self.handler._handler
        if inner is not None and state:
            inner.load_state_dict(dict(state))

    @property
    def stopped(self) -> bool:
        inner = self.handler._handler
        return inner is not None and inner.counter >= inner.patience


class _BestModelState:
    """Which score the best-model file of a ``CheckpointSaver`` has, so a resumed run only replaces a worse one."""

    def __init__(self, saver: CheckpointSaver) -> None:
        self.saver = saver

    def state_dict(self) -> dict[str, Any]:
        tracker = self.saver._key_metric_checkpoint
        saved = [] if tracker is None else tracker.state_dict()["_saved"]
        return {"_saved": [[float(priority), str(name)] for priority, name in saved]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.saver._key_metric_checkpoint is not None:
            self.saver.load_state_dict({"_saved": [tuple(item) for item in state["_saved"]]})


class ResumableStates:
    """Have a :class:`~medcore_monai.handlers.TrainingCheckpoint` save and restore what it does not know itself.

    Attach it to the trainer after the ``TrainingCheckpoint``: it registers the LR scheduler, and the evaluator's
    early stopping and best-model saver, and restores their states when the checkpoint resumed the run. A run that
    had stopped early stays stopped.

    Args:
        lr_scheduler: the trainer's scheduler (stepped per epoch by ``LrScheduleHandler``).
        validation_handlers: the evaluator's handlers; ``EarlyStopHandler`` and ``CheckpointSaver`` among them are
            registered.
    """

    def __init__(self, lr_scheduler: Any = None, validation_handlers: Iterable[Any] | None = None) -> None:
        self.states: dict[str, Any] = {}
        if lr_scheduler is not None:
            self.states["lr_scheduler"] = lr_scheduler
        for index, handler in enumerate(validation_handlers or ()):
            if isinstance(handler, EarlyStopHandler):
                self.states[f"early_stopping_{index}"] = _EarlyStopState(handler)
            elif isinstance(handler, CheckpointSaver):
                self.states[f"checkpoint_saver_{index}"] = _BestModelState(handler)

    def attach(self, engine: Engine) -> None:
        """Register the states now; restore them when the run starts (after the checkpoint has loaded)."""
        for name, obj in self.states.items():
            register_state(engine, name, obj)
        engine.add_event_handler(Events.STARTED, self._restore)

    def _restore(self, engine: Engine) -> None:
        for name, obj in self.states.items():
            state = resumed_state(engine, name)
            if state is not None:
                obj.load_state_dict(state)
        if any(getattr(obj, "stopped", False) for obj in self.states.values()):
            logger.info("the resumed run had stopped early after epoch %d: nothing left to do", engine.state.epoch)
            engine.terminate()


class EpochSeeding:
    """Reseed the random training transforms from ``seed + epoch`` when each epoch starts.

    Their random states are not part of the training checkpoint; seeding them per epoch makes epoch ``e`` draw the
    same boxes and corruptions whether the run was interrupted before it or not.

    Args:
        seed: experiment seed.
        transform: the training transform (a ``Compose`` or any ``Randomizable``).
    """

    def __init__(self, seed: int, transform: Randomizable) -> None:
        self.seed, self.transform = int(seed), transform

    def attach(self, engine: Engine) -> None:
        """Reseed on ``EPOCH_STARTED`` (Ignite builds the epoch's data iterator afterwards)."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Reseed for the epoch starting now."""
        self.transform.set_random_state(seed=self.seed + engine.state.epoch)
