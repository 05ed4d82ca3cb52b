"""Running the project's MONAI bundle from Python, with its errors unwrapped.

The bundle in ``bundle/`` is the one definition of every workflow; :func:`run_workflow` runs a workflow section
through MONAI's ``ConfigWorkflow`` exactly as ``python -m monai.bundle run`` does, so Python callers (tests,
benchmarks, :func:`medcore_monai.prune.run_prune`) and command-line users get the same run. MONAI wraps every
error of a config expression in ``RuntimeError("Failed to evaluate ...")``; the project's own error (a
:class:`~medcore_monai.config.ConfigError`, a ``DataError`` or a ``CheckpointError``) is re-raised instead, with
the one clear message it carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import root_cause

__all__ = ["BUNDLE_DIR", "run_workflow"]

#: The bundle shipped with the project (present in a source checkout; a wheel carries only the package).
BUNDLE_DIR = Path(__file__).resolve().parents[1] / "bundle"


def run_workflow(
    run_id: str, configs: Sequence[str | Path] = ("train.yaml",), bundle_dir: str | Path | None = None, **overrides: Any
) -> Any:
    """Run a section of the bundle (``initialize``, ``run_id``, ``finalize``) with ``overrides``.

    Args:
        run_id: the workflow section (``prune``, ``run``, ``evaluate``, ...).
        configs: config files, relative to ``<bundle_dir>/configs`` unless absolute (presets may be anywhere).
        bundle_dir: the bundle folder (default: :data:`BUNDLE_DIR`).
        overrides: config ids to override (``head_sparsity=0.3``, ``**{"train#trainer#max_epochs": 1}``).

    Returns:
        The value of the run section.

    Raises:
        FileNotFoundError: when the bundle is not there (an installed wheel without the source tree).
        ConfigError, DataError, CheckpointError: the project's own error, unwrapped.
    """
    from monai.bundle import ConfigWorkflow

    bundle = Path(bundle_dir) if bundle_dir is not None else BUNDLE_DIR
    if not (bundle / "configs").is_dir():
        raise FileNotFoundError(f"the MONAI bundle is not at {bundle}; pass bundle_dir (the repository's bundle/)")
    files = [str(f if Path(f).is_absolute() else bundle / "configs" / f) for f in configs]
    workflow = ConfigWorkflow(
        config_file=files, run_id=run_id, workflow_type=None, **({"bundle_root": str(bundle)} | overrides)
    )
    try:
        workflow.initialize()
        result = workflow.run()
        workflow.finalize()
    except Exception as error:
        cause = root_cause(error)
        if cause is error:
            raise
        raise cause from None
    return result
