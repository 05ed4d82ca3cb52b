"""Write an evaluator's binary predictions next to nothing else: PNG at the image's size, NIfTI with its geometry."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from PIL import Image

from ..files import atomic_path
from ..transforms.volumes import volume_name

__all__ = ["PredictionWriter"]

logger = logging.getLogger(__name__)


def _source(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return str(value.meta.get("filename_or_obj", "")) if isinstance(value, MetaTensor) else ""


class PredictionWriter:
    """Save every prediction of an evaluator as ``<folder>/<dataset>/<name>.png`` or ``.nii.gz``.

    2-D predictions become 0/255 PNGs of the image's own size; volumes become NIfTI files with the affine and header
    of the image they were predicted from (slices without a prompt stay 0).

    Args:
        folder: output folder.
        pred_key: key of the binary prediction in the decollated output.
    """

    def __init__(self, folder: str | Path, pred_key: str = "pred") -> None:
        self.folder, self.pred_key = Path(folder), pred_key
        self.written: list[str] = []

    def attach(self, engine: Engine) -> None:
        """Write after every iteration; log a summary at the end."""
        engine.add_event_handler(Events.STARTED, lambda _: self.written.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._summary)

    def __call__(self, engine: Engine) -> None:
        """Write the predictions of the current batch."""
        for item, output in zip(engine.state.batch, engine.state.output):
            self.written.append(str(self._write(item, output[self.pred_key])))

    def _write(self, item: Mapping[str, Any], pred: torch.Tensor) -> Path:
        mask = (torch.as_tensor(pred).detach().cpu().numpy()[0] > 0.5).astype(np.uint8)
        source = _source(item, "image")
        dataset = str(item.get("dataset", "data"))
        if mask.ndim == 3:
            return self._nifti(self.folder / dataset / f"{volume_name(source)}.nii.gz", mask, source)
        name = str(item.get("name") or Path(source).stem)
        path = self.folder / dataset / f"{name}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(mask * 255).save(tmp, format="PNG")
        return path

    @staticmethod
    def _nifti(path: Path, mask: np.ndarray, source: str) -> Path:
        import nibabel as nib

        reference = nib.load(source)
        with atomic_path(path) as tmp:
            nib.save(nib.Nifti1Image(mask, reference.affine, reference.header), tmp)
        return path

    def _summary(self, _: Engine) -> None:
        logger.info("wrote %d predictions to %s", len(self.written), self.folder)
