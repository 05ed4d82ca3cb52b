"""MONAI Label app serving and training the MedCore MedSAM bundle (box prompts, dense or pruned models).

Start it with (docs/monai_label.md)::

    monailabel start_server --app label_app --studies <images> [--conf checkpoint <model.pt>] [--conf bundle <dir>]

``--conf bundle``: the bundle folder to serve (default ``label_app/model/medsam``, copied from the repository's
``bundle/`` on first start); ``--conf checkpoint``: the (pruned) checkpoint to install as its ``models/model.pt`` on
first start; ``--conf skip_trainers true``: serve without training.
"""

from __future__ import annotations

import logging

import monailabel
from lib.bundle_setup import prepare_bundle
from lib.tasks import MedSAMInferTask, MedSAMTrainTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

MODEL_NAME = "medsam"


class MedCoreApp(MONAILabelApp):
    """One model, ``medsam``: box-prompted segmentation of 2-D images and of volumes (slice by slice)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = str(prepare_bundle(app_dir, conf))
        logger.info("serving the bundle %s", self.bundle)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MedCore MedSAM ({monailabel.__version__})",
            description="Box-prompted MedSAM, dense or MedCore-pruned, served and trained from its MONAI bundle",
        )

    def init_infers(self):
        """The bundle's inference task (``configs/inference.yaml``)."""
        return {MODEL_NAME: MedSAMInferTask(self.bundle, self.conf)}

    def init_trainers(self):
        """The bundle's training task (``configs/train.yaml``), unless ``skip_trainers``."""
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        return {MODEL_NAME: MedSAMTrainTask(self.bundle, self.conf)}

    def init_strategies(self):
        """Image selection for labelling."""
        return {"random": Random(), "first": First()}
