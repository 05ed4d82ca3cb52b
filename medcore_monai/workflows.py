"""Entry points of the bundle's remaining flat-key workflows: export and fuse.

``prune``, ``evaluate``, ``infer``, ``finetune``, ``leverage`` and ``run`` are overlays on ``train.yaml`` built
from config components (engines, handlers, transforms); these two are single function calls. Each takes plain keyword
settings (the bundle's config keys), checks its inputs before doing any work, writes its outputs atomically into
``output_dir`` and returns a JSON-safe summary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import input_problems, raise_problems
from .files import write_json_atomic
from .networks import load_sam, read_checkpoint, save_sam
from .networks.build import file_sha256

__all__ = ["export", "fuse"]

logger = logging.getLogger(__name__)


def _problems_for_inputs(checkpoint: str | None, data_roots: Sequence[str] | None) -> list[str]:
    return input_problems({"checkpoint": checkpoint}, data_roots)


def export(
    checkpoint: str,
    output_dir: str = "outputs/export",
    formats: Sequence[str] = ("torchscript", "onnx"),
) -> dict[str, Any]:
    """Export the (compact) image encoder to TorchScript and/or ONNX with a manifest; copy the checkpoint.

    Writes ``model.pt`` (the compact checkpoint, reloadable with :func:`medcore_monai.networks.load_sam`),
    ``image_encoder.ts`` / ``image_encoder.onnx`` (each verified against eager) and ``export_manifest.json``.
    """
    raise_problems(_problems_for_inputs(checkpoint, None), "export")
    unknown = sorted(set(formats) - {"torchscript", "onnx"})
    raise_problems([f"unknown export formats {unknown}; use torchscript and/or onnx"] if unknown else [], "export")
    from .networks.export import export_onnx, export_torchscript, write_export_manifest

    output = Path(output_dir)
    if output.resolve() == Path(checkpoint).resolve().parent and Path(checkpoint).name == "model.pt":
        raise ValueError(f"output_dir {output} would overwrite the input checkpoint {checkpoint}")
    sam = load_sam(checkpoint)
    files = [save_sam(sam, output / "model.pt", metadata={"exported_from": str(checkpoint)})]
    if "torchscript" in formats:
        files.append(export_torchscript(sam, output / "image_encoder.ts"))
    if "onnx" in formats:
        files.append(export_onnx(sam.image_encoder, output / "image_encoder.onnx"))
    manifest = write_export_manifest(
        sam, output / "export_manifest.json", extra={"source": str(checkpoint)}, files=files
    )
    return {"files": [str(f) for f in files], "manifest": str(manifest)}


def fuse(
    checkpoint: str,
    robustsam_ckpt: str,
    output_dir: str = "outputs/fuse",
    filename: str = "model_fused.pt",
) -> dict[str, Any]:
    """RobustMedSAM's module-wise fusion: image and prompt encoders from ``checkpoint``, decoder from RobustSAM.

    ``checkpoint`` is a MedSAM checkpoint in any official layout or this project's compact (pruned) file;
    ``robustsam_ckpt`` an official RobustSAM checkpoint of the same encoder size. Every key is checked
    against the fused architecture; the fused file keeps a pruned encoder's widths and reloads with
    :func:`medcore_monai.networks.load_sam` (which then returns a RobustSAM-decoder model).

    Writes ``<output_dir>/<filename>`` and ``fusion.json`` (sources, SHA-256, tensor counts).
    """
    problems = _problems_for_inputs(checkpoint, None)
    if not Path(robustsam_ckpt).is_file():
        problems.append(f"robustsam_ckpt not found: {robustsam_ckpt}")
    target = Path(output_dir) / filename
    if target.resolve() in {Path(checkpoint).resolve(), Path(robustsam_ckpt).resolve()}:
        problems.append(f"output {target} would overwrite an input checkpoint")
    raise_problems(problems, "fusion")
    from .networks import fuse_checkpoints

    path = fuse_checkpoints(checkpoint, robustsam_ckpt, target)
    fused = read_checkpoint(path)
    summary = {
        "checkpoint": str(path),
        "sha256": file_sha256(path),
        "fusion": fused.get("metadata", {}).get("fusion", {}),
    }
    write_json_atomic(Path(output_dir) / "fusion.json", summary)
    return summary
