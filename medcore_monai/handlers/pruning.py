"""The MedCore cascade as Ignite handlers on a :class:`medcore_monai.engines.RecoveryTrainer`.

One trainer epoch is one cascade stage (heads, then MLP channels, with TinyViT's MBConv hidden channels when
``mbconv_sparsity`` asks for them: both are feed-forward channels). :class:`PruningHandler` calibrates and scores
when the trainer starts, and at each epoch start plans the stage's removals, slims the network, rebuilds the
optimizer and re-wraps DDP; recovery then trains through the epoch. :class:`StageRecorder` records the model's
cost and the evaluator's metrics after every evaluation (``ValidationHandler`` with ``exec_at_start``: the dense
model, then each stage), and :class:`PruneReport` writes the run's outputs when the trainer completes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn

from ..engines.distributed import data_parallel
from ..engines.measure import model_cost
from ..engines.recovery import reestimate_batchnorm
from ..networks.conv_groups import conv_blocks, conv_kept_indices, no_mbconv_blocks_message
from ..networks.structure import StructuredMasks
from ..pruning.cascade import CascadeConfig, CascadeState, initial_scores
from ..pruning.fisher import FisherCalibration
from .checkpointing import register_state, resumed_state
from .evaluation import DatasetMetrics

__all__ = ["STAGE_NAMES", "PruningHandler", "StageRecorder"]

logger = logging.getLogger(__name__)

STAGE_NAMES = ("heads", "mlp")


def _model(network: nn.Module) -> nn.Module:
    return getattr(network, "module", network)


class PruningHandler:
    """Calibrate, score, plan and slim at the cascade's stage boundaries.

    Results go to ``engine.state.pruning`` (this handler): ``budgets``, ``details`` (the arrays of ``scores.npz``),
    ``fisher_counts``, ``timing`` and the kept indices.

    Args:
        cascade: the cascade's settings (budgets, score method, floors, protected blocks, ...).
        calibration: per-dataset lists of preprocessed calibration samples (tight boxes, unique names).
        reference: the general SAM as a MedSAM module (``dual`` and ``reset`` scores), else ``None``.
        precomputed: ``(scores, details, sensitivity)`` from an earlier scoring of the same model and data.
        progress: progress bars during calibration.
        on_stage: called as ``on_stage(stage, model)`` when a stage's epoch completes.
        calibrator: the Fisher calibration component (default: built from the cascade's settings).
    """

    def __init__(
        self,
        cascade: CascadeConfig,
        calibration: Mapping[str, Sequence[Mapping[str, Any]]],
        reference: nn.Module | None = None,
        precomputed: tuple | None = None,
        progress: bool = True,
        on_stage: Callable[[str, nn.Module], None] | None = None,
        calibrator: FisherCalibration | None = None,
    ) -> None:
        if precomputed is not None and cascade.recompute_mlp_scores:
            raise ValueError("precomputed scores cannot be combined with recompute_mlp_scores")
        if cascade.score in ("dual", "reset") and reference is None and precomputed is None:
            raise ValueError(f"score {cascade.score!r} needs the general SAM the model came from (sam_ckpt)")
        self.cascade, self.calibration, self.reference = cascade, dict(calibration), reference
        self.precomputed, self.progress, self.on_stage = precomputed, progress, on_stage
        self.calibrator = calibrator
        self.state: CascadeState | None = None
        self.scores = self.details = self.sensitivity = None
        self.fisher_sam = self.sam_weights = None
        self.budgets: list[dict[str, Any]] = []
        self.applied: list[str] = []
        self.fisher_counts: dict[str, dict[str, int]] = {}
        self.timing: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        """Score when the trainer starts, prune at each epoch start, report each finished stage."""
        register_state(engine, "pruning", self)
        engine.state.pruning = self
        engine.add_event_handler(Events.STARTED, self._resume)
        engine.add_event_handler(Events.STARTED, self.score)
        engine.add_event_handler(Events.EPOCH_STARTED, self.prune_stage)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stage_done)
        engine.add_event_handler(Events.COMPLETED, self.finalize)

    def _resume(self, engine: Engine) -> None:
        restored = resumed_state(engine, "pruning")
        if restored is None:
            return
        self.load_state_dict(restored)
        if restored.get("masks") is not None:  # slim: false, the hooks are not part of the saved network
            self._cascade_state(engine).restore_masks(StructuredMasks(**restored["masks"]))

    def finalize(self, engine: Engine) -> None:
        """End a masked cascade (``slim: false``) compact, so the saved model is the pruned one."""
        if self.state is not None and self.state.masked:
            self.state.finalize()
            logger.info("masked groups removed: the pruned model is saved compact")

    def _cascade_state(self, engine: Engine) -> CascadeState:
        if self.state is None:
            device = engine.state.device
            self.state = CascadeState(
                _model(engine.network), self.reference, self.calibration, self.cascade, device, self.progress
            )
        self.state.model = _model(engine.network)
        return self.state

    def score(self, engine: Engine) -> None:
        """Calibrate and score the model once (a resumed run keeps its scores)."""
        if self.scores is not None:
            return
        self._check_mbconv(_model(engine.network))
        state = self._cascade_state(engine)
        if self.precomputed is not None:
            self.scores, self.details, self.sensitivity = self.precomputed
        else:
            self.scores, self.details, self.sensitivity, self.fisher_sam, self.sam_weights = initial_scores(state)
        self.fisher_counts.update(state.fisher_counts)
        self.timing.update(state.timing)

    def _check_mbconv(self, model: nn.Module) -> None:
        if self.cascade.mbconv_sparsity and not conv_blocks(model.image_encoder):
            raise ValueError(no_mbconv_blocks_message(self.cascade.mbconv_sparsity))

    def prune_stage(self, engine: Engine) -> None:
        """Remove this epoch's family (heads, then channels), slim, and give the trainer a fresh optimizer."""
        stage = STAGE_NAMES[min(engine.state.epoch, len(STAGE_NAMES)) - 1]
        if stage in self.applied:
            return
        state = self._cascade_state(engine)
        start = time.perf_counter()
        if stage == "mlp" and self.cascade.recompute_mlp_scores:
            fishers = state.timed("fisher", state.fisher_per_dataset, "after_heads")
            self.scores, _ = state.timed("scores", state.scores, fishers, self.fisher_sam, self.sam_weights)
            self.sensitivity = state.sensitivity(fishers)
            self.details["mlp_scores_recomputed"] = torch.cat(self.scores.channels).cpu().numpy()
            if self.scores.convs:
                self.details["mbconv_scores_recomputed"] = torch.cat(self.scores.convs).cpu().numpy()
                self.details["mbconv_sensitivity"] = state.conv_sensitivity(fishers).numpy()
            self.fisher_counts.update(state.fisher_counts)
        heads = self.scores.heads if stage == "heads" else None
        channels = self.scores.channels if stage == "mlp" else None
        convs, conv_sensitivity = self._conv_plan(stage)
        reports = state.plan(heads, channels, self.sensitivity, stage, convs, conv_sensitivity)
        if self.cascade.reestimate_batchnorm:
            state.timed("batchnorm", reestimate_batchnorm, state.model, state.pooled, state.device)
        self.budgets.extend(report.to_dict() for report in reports)
        self.applied.append(stage)
        self.timing["plan"] = self.timing.get("plan", 0.0) + time.perf_counter() - start
        self.timing.update({k: v for k, v in state.timing.items() if k != "plan"})
        self._rewrap(engine)
        for report in reports:
            logger.info("pruned %s: %d of %d removed", report.family, report.achieved, report.total)

    def _conv_plan(self, stage: str) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """MBConv scores and sensitivity for the MLP stage, when the cascade asks for MBConv pruning."""
        if stage != "mlp" or not self.cascade.mbconv_sparsity:
            return None, None
        if not self.scores.convs:
            raise ValueError("mbconv_sparsity > 0 needs an encoder with MBConv blocks (LiteMedSAM's TinyViT)")
        return self.scores.convs, torch.as_tensor(np.asarray(self.details["mbconv_sensitivity"]))

    def _rewrap(self, engine: Engine) -> None:
        if hasattr(engine, "rebuild_optimizer"):  # a RecoveryTrainer re-wraps DDP around the slimmed model
            engine.rebuild_optimizer()
        else:
            engine.network = data_parallel(_model(engine.network), engine.state.device)

    def _stage_done(self, engine: Engine) -> None:
        if self.on_stage is not None and self.applied:
            self.on_stage(self.applied[-1], _model(engine.network))

    def pruned_network(self, engine: Engine) -> nn.Module:
        """The network as pruned so far: the trainer's own, or a compact copy while masks hide the removed groups."""
        if self.state is not None and self.state.masked:
            return self.state.compact_copy()
        return _model(engine.network)

    def kept(self, engine_or_model: Any) -> tuple[list[list[int]], list[list[int]]]:
        """Kept heads and channels per block (original indices)."""
        if self.state is not None:
            return self.state.kept()
        from ..networks.structure import kept_indices, prunable_blocks

        blocks = prunable_blocks(_model(getattr(engine_or_model, "network", engine_or_model)).image_encoder)
        return [kept_indices(b)[0] for b in blocks], [kept_indices(b)[1] for b in blocks]

    def kept_convs(self, engine_or_model: Any) -> list[list[int]]:
        """Kept MBConv hidden channels per MBConv block (original indices; empty for SAM's ViT)."""
        if self.state is not None:
            return self.state.kept_convs()
        encoder = _model(getattr(engine_or_model, "network", engine_or_model)).image_encoder
        return [conv_kept_indices(b) for b in conv_blocks(encoder)]

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the scores, budgets and stages done."""
        return {
            "scores": None
            if self.scores is None
            else {"heads": self.scores.heads, "channels": self.scores.channels, "convs": self.scores.convs},
            "details": {k: torch.as_tensor(np.asarray(v)) for k, v in (self.details or {}).items()},
            "sensitivity": self.sensitivity,
            "budgets": self.budgets,
            "applied": self.applied,
            "fisher_counts": self.fisher_counts,
            "timing": self.timing,
            "masks": vars(self.state.masks) if self.state is not None and self.state.masked else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        from ..pruning.scores import GroupScores

        if state["scores"] is not None:
            scores = state["scores"]
            self.scores = GroupScores(list(scores["heads"]), list(scores["channels"]), list(scores.get("convs", [])))
        self.details = {k: v.numpy() for k, v in state["details"].items()}
        self.sensitivity = state["sensitivity"]
        self.budgets, self.applied = list(state["budgets"]), list(state["applied"])
        self.fisher_counts, self.timing = dict(state["fisher_counts"]), dict(state["timing"])


class StageRecorder:
    """Cost and metrics of the model after every evaluation of the cascade (dense, after heads, after MLP).

    Attach it to the trainer; it listens to ``evaluator``. Rows go to ``engine.state.stages`` (a list of dicts
    with ``stage``, the cost, the macro metrics and ``datasets``: the per-dataset metrics with ``n``).
    """

    def __init__(self, evaluator: Engine, names: Sequence[str] = ("dense", "after heads", "after mlp")) -> None:
        self.evaluator, self.names = evaluator, list(names)
        self.metrics = DatasetMetrics()
        self.rows: list[dict[str, Any]] = []
        self.timing: dict[str, float] = {}
        self._started = 0.0

    def attach(self, engine: Engine) -> None:
        """Listen to the evaluator; keep rows across a resume."""
        self.trainer = engine
        register_state(engine, "stages", self)
        engine.add_event_handler(Events.STARTED, self._resume)
        engine.state.stages = self.rows
        engine.state.stage_timing = self.timing
        self.metrics.attach(self.evaluator)
        self.evaluator.add_event_handler(Events.STARTED, self._start_clock)
        self.evaluator.add_event_handler(Events.COMPLETED, self._record)

    def _resume(self, engine: Engine) -> None:
        restored = resumed_state(engine, "stages")
        if restored is not None:
            self.load_state_dict(restored)

    def _start_clock(self, _: Engine) -> None:
        self._started = time.perf_counter()

    def _record(self, evaluator: Engine) -> None:
        pruning = getattr(self.trainer.state, "pruning", None)
        done = len(pruning.applied) if pruning is not None else min(evaluator.state.epoch, len(self.names) - 1)
        stage = self.names[min(done, len(self.names) - 1)]
        results = self.metrics.results
        network = pruning.pruned_network(self.trainer) if pruning is not None else self.trainer.network
        row = {"method": "cascade", "stage": stage, **model_cost(network)}
        row |= {k: v for k, v in results.get("macro", {}).items()}
        row["datasets"] = {d: r for d, r in results.items() if d != "macro"}
        self.rows[:] = [r for r in self.rows if r["stage"] != stage] + [row]
        self.timing[f"evaluate_{stage.replace(' ', '_')}"] = time.perf_counter() - self._started

    def state_dict(self) -> dict[str, Any]:
        """The rows recorded so far."""
        return {"rows": self.rows, "timing": self.timing}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.rows[:] = list(state["rows"])
        self.timing.update(state["timing"])
