"""Optional TensorBoard logging of training engines through MONAI's ``TensorBoardStatsHandler``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["attach_tensorboard"]


def attach_tensorboard(
    engine: Engine,
    log_dir: str | Path,
    tag: str,
    output_transform: Callable[[Any], Any] | None = None,
    epoch_log: bool = False,
    epoch_of: Callable[[int], int] | None = None,
) -> bool:
    """Log ``output_transform(engine.state.output)`` per iteration (and metrics per epoch) under ``tag``.

    Only the main process writes, so distributed runs give one event file. The writer is closed when
    the engine completes, which flushes the file.

    Args:
        engine: the trainer.
        log_dir: the TensorBoard log folder (``tensorboard --logdir <log_dir>``).
        tag: scalar name prefix, e.g. ``recovery_heads``.
        output_transform: picks the scalar (the loss), or a dict of named scalars logged as
            ``<tag>/<name>``, from the iteration output; ``None`` logs no iterations.
        epoch_log: also log ``engine.state.metrics`` at each epoch end.
        epoch_of: maps the engine's epoch to the logged step, e.g. ``lambda _: trainer.state.epoch``
            for an evaluator that runs once per training epoch.

    Returns:
        Whether a handler was attached (False on non-main processes).

    Raises:
        ImportError: with the install hint, when the ``tensorboard`` package is missing.
    """
    import ignite.distributed as idist

    if idist.get_rank() != 0:
        return False
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch only ships the writer's front end
        hint = "pip install 'medcore-monai[tensorboard]'"
        raise ImportError(f"TensorBoard logging needs the tensorboard package: {hint}") from err
    from monai.handlers import TensorBoardStatsHandler

    def tagged(output: Any) -> Any:
        value = output_transform(output) if output_transform is not None else None
        # MONAI names dict entries by their keys alone; keep the stage/run prefix
        return {f"{tag}/{k}": v for k, v in value.items()} if isinstance(value, dict) else value

    writer = SummaryWriter(log_dir=str(log_dir))
    TensorBoardStatsHandler(
        summary_writer=writer,
        iteration_log=output_transform is not None,
        epoch_log=epoch_log,
        output_transform=tagged,
        global_epoch_transform=epoch_of or (lambda epoch: epoch),
        tag_name=tag,
    ).attach(engine)
    engine.add_event_handler(Events.COMPLETED, lambda _: writer.close())
    return True
