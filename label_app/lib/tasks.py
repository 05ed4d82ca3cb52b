"""MONAI Label tasks for the MedCore bundle: MONAI Label's own bundle tasks with two serving fixes.

- A bad request (an invalid ``roi``, a volume without a 3-D box) reaches the client as HTTP 422 with the bundle's
  one-line message instead of "Internal Server Error", and is logged as one line.
- 2-D masks are written as PNG unless the request names another ``result_extension``: the default would reuse the
  image's extension, and a JPEG mask is lossy (stray label values).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

from medcore_monai.data.errors import DataError

logger = logging.getLogger(__name__)

_BAD_REQUEST = 422
MIN_LABELLED = 2  # one to train on, one to validate on
_VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def request_problem(error: BaseException) -> str | None:
    """The bundle's message for an error caused by the request, or ``None`` for an internal failure.

    MONAI wraps transform errors in ``RuntimeError`` ("applying transform ..."); the cause chain holds the
    ``DataError`` the bundle raised about the input (a bad ``roi``, a NaN image, a volume without a 3-D box).
    Any other error is the server's, and stays an internal error.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DataError):
            return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        error = error.__cause__ or error.__context__
    return None


class MedSAMInferTask(BundleInferTask):
    """``BundleInferTask`` that reports bad requests to the client and writes 2-D masks losslessly."""

    def __call__(self, request: dict[str, Any], *args: Any, **kwargs: Any):
        """Run the request; a request error becomes HTTP 422 with its message."""
        try:
            return super().__call__(request, *args, **kwargs)
        except Exception as error:
            problem = request_problem(error)
            if problem is None:
                raise
            logger.error("infer request refused: %s", problem)
            raise HTTPException(status_code=_BAD_REQUEST, detail=problem) from None

    def writer(self, data: dict[str, Any], extension: str | None = None, dtype: Any = None):
        """Write the mask; 2-D results default to PNG (lossless 0/1) when the request names no extension."""
        if extension is None and not data.get("result_extension") and not _is_volume(data):
            extension = ".png"
        return super().writer(data, extension=extension, dtype=dtype)


def _is_volume(data: dict[str, Any]) -> bool:
    image = str(data.get("image_path") or data.get("image") or "").lower()
    return image.endswith(_VOLUME_EXTENSIONS)


class MedSAMTrainTask(BundleTrainTask):
    """``BundleTrainTask`` that refuses to start without labelled images, with a message saying what to do."""

    def __call__(self, request: dict[str, Any], datastore: Any):
        """Train on the datastore's labelled images (``train.yaml``), or raise a clear error when there are none."""
        labelled = [d for d in datastore.datalist() if d and d.get("label")]
        if len(labelled) < MIN_LABELLED:
            problem = (
                f"training needs at least {MIN_LABELLED} labelled images in the datastore, found {len(labelled)}: "
                "save final labels (PUT /datastore/label) and train again"
            )
            logger.error("train request refused: %s", problem)
            raise HTTPException(status_code=_BAD_REQUEST, detail=problem)
        return super().__call__(request, datastore)
