"""Boundary leverage of the dense model, measured when a pruning run starts, from the scores it prunes with."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from ignite.engine import Engine, Events
from torch import nn

from ..engines.leverage import run_leverage_analysis
from ..pruning.cascade import CascadeConfig
from .checkpointing import register_state, resumed_state

__all__ = ["LeverageAnalysis", "leverage_report"]

logger = logging.getLogger(__name__)


class LeverageAnalysis:
    """BLR95 of head vs MLP pruning steps on the dense model (``engine.state.leverage``), with its histogram.

    Attach it after :class:`~medcore_monai.handlers.PruningHandler`: it reuses that handler's scores, so the
    run calibrates once.

    Args:
        output_dir: folder for ``leverage.json`` and ``leverage_histogram.png``.
        head_levels: head sparsities of the grid.
        mlp_levels: MLP sparsities of the grid.
        samples: calibration images per dataset used by the grid (``None``: all).
        tau: boundary band half-width (pixels at the decoder's resolution).
    """

    def __init__(
        self,
        output_dir: str | Path,
        head_levels: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        mlp_levels: Sequence[float] = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95),
        samples: int | None = None,
        tau: float = 3.0,
    ) -> None:
        self.output_dir, self.samples, self.tau = Path(output_dir), samples, tau
        self.head_levels, self.mlp_levels = tuple(head_levels), tuple(mlp_levels)
        self.result: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Measure once the pruning handler has scored (a resumed run keeps its result)."""
        register_state(engine, "leverage", self)
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Run the leverage grid on the (still dense) model."""
        import ignite.distributed as idist

        restored = resumed_state(engine, "leverage")
        if restored is not None:
            self.load_state_dict(restored)
        if self.result is None:
            pruning = engine.state.pruning
            model = getattr(engine.network, "module", engine.network)
            subset = {name: list(group)[: self.samples] for name, group in pruning.calibration.items()}
            self.result = run_leverage_analysis(
                model,
                subset,
                pruning.cascade,
                pruning.reference,
                head_levels=self.head_levels,
                mlp_levels=self.mlp_levels,
                tau=self.tau,
                device=engine.state.device,
                output_dir=self.output_dir if idist.get_rank() == 0 else None,
                progress=False,
                precomputed=(pruning.scores, pruning.details, pruning.sensitivity),
            )
        engine.state.leverage = self.result

    def state_dict(self) -> dict:
        """The measured result."""
        return {"result": self.result}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.result = state["result"]


def leverage_report(
    network: nn.Module,
    calibration: Mapping[str, Sequence[Mapping]],
    cascade: CascadeConfig,
    reference: nn.Module | None,
    head_levels: Sequence[float],
    mlp_levels: Sequence[float],
    tau: float,
    output_dir: str | Path,
    progress: bool = True,
) -> dict:
    """The bundle's ``leverage`` workflow: score, run the leverage grid, write the report, log a summary."""
    result = run_leverage_analysis(
        network,
        calibration,
        cascade,
        reference,
        head_levels=tuple(head_levels),
        mlp_levels=tuple(mlp_levels),
        tau=tau,
        output_dir=output_dir,
        progress=progress,
    )
    images = sum(len(group) for group in calibration.values())
    logger.info("BLR95 %.3f on %d calibration images; written to %s", result["summary"]["blr95"], images, output_dir)
    return result
