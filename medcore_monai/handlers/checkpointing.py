"""Resumable training: the whole state of a run in one file, restored before the run continues.

Ignite's ``Checkpoint`` saves objects with a ``state_dict``; a pruning run also changes the network's *shape*
between stages and draws its images from seeded samplers, so an exact resume needs more. :class:`TrainingCheckpoint`
saves, atomically, the network in the project's checkpoint format (weights plus per-block widths and kept
indices), the optimizer, the engine's counters, the trainer's loss history, the global random states and the state
of every handler that registers with it (see :func:`resumed_state`). When the run starts it restores all of that,
slimming the network to the saved widths first, and Ignite continues from the restored iteration (the data
iterator is recreated; :class:`~medcore_monai.engines.recovery.RecoverySampler` skips the draws already used);
stale temporary files of an interrupted save are removed.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ..config import ConfigError, fingerprint_differences
from ..files import atomic_torch_save
from ..networks import CheckpointError, read_checkpoint
from ..networks.conv_groups import conv_blocks, conv_kept_indices, slim_conv_block_
from ..networks.manifest import model_manifest
from ..networks.structure import kept_indices, prunable_blocks, slim_block_

__all__ = ["RESUMED_KEY", "TrainingCheckpoint", "register_state", "resumed_state", "slim_to_manifest"]

logger = logging.getLogger(__name__)

#: ``engine.state`` attribute holding the handler states of a resumed checkpoint until each handler takes its own.
RESUMED_KEY = "resumed_handlers"
_REGISTRY_KEY = "checkpointed_handlers"


def _model(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)


def slim_to_manifest(
    model: nn.Module, blocks: list[Mapping[str, Any]], conv_entries: list[Mapping[str, Any]] = ()
) -> None:
    """Slim ``model``'s encoder to the kept groups a manifest lists (original indices).

    ``blocks`` lists the attention blocks' heads and MLP channels, ``conv_entries`` the MBConv blocks' hidden
    channels (TinyViT; a manifest written before MBConv pruning has none).

    Raises:
        CheckpointError: if the manifest keeps a group the model has already removed.
    """
    for index, (block, entry) in enumerate(zip(conv_blocks(model.image_encoder), conv_entries)):
        have, want = conv_kept_indices(block), list(entry["kept_channels"])
        if have == want:
            continue
        if not set(want) <= set(have):
            raise CheckpointError(f"MBConv block {index} of the checkpoint keeps channels this model has removed")
        slim_conv_block_(block, [have.index(c) for c in want])
    for index, (block, entry) in enumerate(zip(prunable_blocks(model.image_encoder), blocks)):
        heads, channels = kept_indices(block)
        want_heads, want_channels = list(entry["kept_heads"]), list(entry["kept_channels"])
        if (heads, channels) == (want_heads, want_channels):
            continue
        if not (set(want_heads) <= set(heads) and set(want_channels) <= set(channels)):
            raise CheckpointError(f"block {index} of the checkpoint keeps groups this model has already removed")
        slim_block_(block, [heads.index(h) for h in want_heads], [channels.index(c) for c in want_channels])


def register_state(engine: Engine, name: str, obj: Any) -> None:
    """Have a :class:`TrainingCheckpoint` on ``engine`` save ``obj.state_dict()`` under ``name``."""
    registry = getattr(engine.state, _REGISTRY_KEY, None)
    if registry is None:
        registry = {}
        setattr(engine.state, _REGISTRY_KEY, registry)
    registry[name] = obj


def resumed_state(engine: Engine, name: str) -> Any | None:
    """The saved state of handler ``name`` when ``engine`` resumed from a :class:`TrainingCheckpoint`, else None."""
    return (getattr(engine.state, RESUMED_KEY, None) or {}).pop(name, None)


def _rng_state() -> dict[str, Any]:
    # plain containers and tensors only: checkpoints load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.random.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingCheckpoint:
    """Save the full training state every ``every_iterations`` and at every epoch end; resume from it on attach.

    Handlers that hold state register it with :func:`register_state` when they attach and read it back with
    :func:`resumed_state` in their own ``STARTED`` handler; attach this handler first, so it restores before them.

    Args:
        folder: where ``filename`` lives.
        every_iterations: also save after this many iterations (``None``: epoch ends only).
        filename: checkpoint file name.
        main_process_only: only rank 0 writes (every process holds the same state).
        fingerprint: what identifies the run's result (:func:`medcore_monai.config.run_fingerprint`); a folder
            holding a checkpoint with another fingerprint is refused, never resumed.
        resume: ``False`` starts over, discarding an existing checkpoint.
    """

    def __init__(
        self,
        folder: str | Path,
        every_iterations: int | None = None,
        filename: str = "checkpoint_latest.pt",
        main_process_only: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
        resume: bool = True,
    ) -> None:
        self.path = Path(folder) / filename
        self.fingerprint, self.resume = dict(fingerprint or {}), resume
        self.every_iterations = every_iterations
        self.main_process_only = main_process_only
        self.resumed_from: dict[str, int] | None = None
        self._savers_attached = False

    def attach(self, engine: Engine) -> None:
        """Resume when the run starts (before any other handler: attach this one first), then save as it goes."""
        engine.add_event_handler(Events.STARTED, self._resume)
        engine.add_event_handler(Events.STARTED, self._attach_savers)

    def _resume(self, engine: Engine) -> None:
        self._remove_stale_temporaries()
        if self.path.is_file() and not self.resume and self.resumed_from is None:
            logger.info("resume is off: starting over, %s is replaced", self.path)
            self.path.unlink()
        if self.path.is_file() and self.resumed_from is None:
            self._load(engine)

    def _attach_savers(self, engine: Engine) -> None:
        # registered once every other handler is attached, so an epoch's state is saved after its evaluation
        if self._savers_attached:
            return
        if self.every_iterations:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=int(self.every_iterations)), self.save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        self._savers_attached = True

    def _remove_stale_temporaries(self) -> None:
        for stale in self.path.parent.glob(f".{self.path.name}.*"):
            logger.info("removing %s, left by an interrupted save", stale)
            stale.unlink(missing_ok=True)

    def state(self, engine: Engine) -> dict[str, Any]:
        """Everything a resumed run needs (see the module docstring)."""
        model = _model(engine.network)
        return {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "medcore": model_manifest(model),
            "optimizer": engine.optimizer.state_dict() if getattr(engine, "optimizer", None) is not None else None,
            "engine": {"iteration": engine.state.iteration, "epoch": engine.state.epoch},
            "losses": {int(k): list(v) for k, v in getattr(engine, "losses", {}).items()},
            "rng": _rng_state(),
            "handlers": {
                name: obj.state_dict() for name, obj in (getattr(engine.state, _REGISTRY_KEY, None) or {}).items()
            },
            "fingerprint": self.fingerprint,
        }

    def _check_fingerprint(self, saved: Mapping[str, Any]) -> None:
        differences = fingerprint_differences(saved, self.fingerprint) if self.fingerprint else []
        if differences:
            raise ConfigError(
                f"{self.path.parent} holds an unfinished or finished run with other settings, so it is not resumed:\n  "
                + "\n  ".join(differences)
                + "\nuse another output_dir, or start over in this one with --resume false"
            )

    def save(self, engine: Engine) -> None:
        """Write the state atomically (rank 0 only under ``torchrun``)."""
        import ignite.distributed as idist

        if self.main_process_only and idist.get_rank() != 0:
            return
        atomic_torch_save(self.state(engine), self.path)

    def _load(self, engine: Engine) -> None:
        saved = read_checkpoint(self.path)
        self._check_fingerprint(saved.get("fingerprint", {}))
        model = _model(engine.network)
        slim_to_manifest(model, saved["medcore"]["blocks"], saved["medcore"].get("conv_blocks") or [])
        model.load_state_dict(saved["model"], strict=True)
        if hasattr(engine, "rebuild_optimizer"):
            engine.rebuild_optimizer()
        if saved["optimizer"] is not None:
            engine.optimizer.load_state_dict(saved["optimizer"])
        # Ignite's own resume semantics: the epoch counts completed epochs; a partial one is finished by run()
        engine.load_state_dict(
            {
                "iteration": saved["engine"]["iteration"],
                "epoch_length": engine.state.epoch_length,
                "max_epochs": engine.state.max_epochs,
            }
        )
        if hasattr(engine, "losses"):
            engine.losses = {int(k): list(v) for k, v in saved["losses"].items()}
        _set_rng_state(saved["rng"])
        setattr(engine.state, RESUMED_KEY, dict(saved["handlers"]))
        self.resumed_from = dict(saved["engine"])
        engine.state.resumed_from = self.resumed_from  # reports say that the run was resumed, and from where
        logger.info("resuming from %s after iteration %d", self.path, saved["engine"]["iteration"])
