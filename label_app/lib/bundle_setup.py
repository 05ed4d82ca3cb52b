"""The bundle folder this app serves, with the ``models/model.pt`` MONAI Label loads and its trainer overwrites.

Default (no ``--conf bundle``): ``<app>/model/medsam``, whose ``configs`` is a link to the repository's
``bundle/configs`` (so the served configs are always the repository's) and whose ``models/`` is the app's own: on
first start ``models/model.pt`` is written from ``--conf checkpoint`` (a dense or pruned MedSAM checkpoint), else from
the shipped tiny MedSAM. Later starts serve what is there, including what MONAI Label trained.

``--conf bundle <folder>`` serves a bundle folder of your own (for example a copy with a CT intensity window); it
gets a ``models/model.pt`` the same way when it has none.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medcore_monai.networks import load_sam, save_sam

logger = logging.getLogger(__name__)

REPOSITORY_BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
SHIPPED_MODEL = REPOSITORY_BUNDLE / "models" / "medsam_tiny.pth"
INFER_CONFIG = Path("configs") / "inference.yaml"


def prepare_bundle(app_dir: str | Path, conf: dict[str, str]) -> Path:
    """The bundle folder to serve, made ready (configs present, ``models/model.pt`` written if missing).

    Raises:
        FileNotFoundError: if ``--conf bundle`` names a folder without ``configs/inference.yaml`` or
            ``--conf checkpoint`` a missing file.
    """
    given = conf.get("bundle")
    if given:
        folder = Path(given).expanduser().resolve()
        if not (folder / INFER_CONFIG).is_file():
            raise FileNotFoundError(f"--conf bundle {given}: no {INFER_CONFIG} in {folder}")
    else:
        folder = Path(app_dir).resolve() / "model" / "medsam"
        link_repository_configs(folder)
    install_model(folder, conf.get("checkpoint"))
    return folder


def link_repository_configs(folder: Path) -> None:
    """Make ``folder/configs`` a link to the repository's ``bundle/configs``."""
    configs = folder / "configs"
    if configs.is_symlink() or configs.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    configs.symlink_to(REPOSITORY_BUNDLE / "configs", target_is_directory=True)


def install_model(folder: Path, checkpoint: str | None) -> None:
    """Write ``models/model.pt`` in the project's checkpoint format unless it exists already.

    Args:
        folder: the bundle folder.
        checkpoint: a SAM/MedSAM checkpoint (dense or pruned) to serve; ``None`` for the shipped tiny MedSAM.
    """
    target = folder / "models" / "model.pt"
    if target.exists():
        if checkpoint:
            logger.warning(
                "serving the existing %s (it may hold MONAI Label training); delete it to serve %s instead",
                target,
                checkpoint,
            )
        return
    source = Path(checkpoint).expanduser() if checkpoint else SHIPPED_MODEL
    if not source.is_file():
        raise FileNotFoundError(f"checkpoint to serve not found: {source}")
    logger.info("writing %s from %s", target, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_sam(load_sam(source), target)
