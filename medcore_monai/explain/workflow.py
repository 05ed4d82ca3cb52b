"""The bundle's ``explain`` workflow: get a flow (load or train), explain test images, write JSON and figures."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError
from ..files import write_json_atomic
from ..tensors import plain_tensor
from .data import flow_training_images
from .flow import VelocityField, as_flow_config, load_flow, train_flow
from .runner import ExplainSettings, ImageExplanation, as_settings, explain_image, summarise

__all__ = ["dense_checkpoint_of", "prepare_flow", "run_explain", "spread_indices"]

logger = logging.getLogger(__name__)

_TRAINING_KEYS = ("steps", "batch_size", "lr", "seed", "reflow_rounds", "reflow_pairs", "reflow_ode_steps")


def _dataset_names(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(s.get("dataset", "data")) for s in samples})


def prepare_flow(
    flow_checkpoint: str | os.PathLike | None,
    training_samples: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    progress: bool = True,
    datasets: Sequence[str] | None = None,
) -> VelocityField:
    """The flow of an explain run: ``flow_checkpoint`` if given, else one trained on ``training_samples``.

    A trained flow is saved (and resumed if interrupted, reused if finished) as ``<output_dir>/flow.pt``. A loaded
    flow must have been trained on the datasets being explained (``datasets``): a flow of brain MR slices says
    nothing about polyp photographs, and its working size and channels would silently reshape them.

    Args:
        flow_checkpoint: a flow file written by this package, or ``None`` to train one.
        training_samples: preprocessed samples ending with :class:`~.data.ToFlowSpaced` (only read to train).
        settings: ``size``, ``channels`` (None: grey when every image is grey), ``widths``, ``res_blocks``,
            ``groups``, ``region_scale`` (the window around the box that flow space covers, as
            :class:`~.data.ToFlowSpaced` cut it; None: the whole image) and the training settings of
            :func:`~.flow.train_flow`.
        output_dir: where a trained flow is written.
        device: where it trains and runs.
        progress: show a progress bar while training.
        datasets: dataset names of the explained images.
    """
    if flow_checkpoint is not None:
        flow = load_flow(flow_checkpoint, device)
        trained_on = flow.metadata.get("datasets")
        if datasets is not None and trained_on is not None and not set(datasets) <= set(trained_on):
            raise ConfigError(
                f"the flow {flow_checkpoint} was trained on {trained_on}, not on {sorted(datasets)}: set "
                "flow_checkpoint to null to train one on these data, or to a flow trained on them"
            )
        return flow
    shape_keys = {"size", "channels", "widths", "res_blocks", "groups"}
    known = shape_keys | set(_TRAINING_KEYS) | {"region_scale"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"unknown flow settings {unknown}; known: {sorted(known)}")
    images = flow_training_images(training_samples, settings.get("channels"))
    shape = {k: settings[k] for k in shape_keys if k in settings and k != "channels"}
    config = as_flow_config(shape, channels=images.shape[1], size=images.shape[-1])
    training = {k: settings[k] for k in _TRAINING_KEYS if k in settings}
    names = _dataset_names(training_samples)
    logger.info("training a %d-channel %dpx flow on %d images of %s", config.channels, config.size, len(images), names)
    return train_flow(
        images,
        config,
        checkpoint=Path(output_dir) / "flow.pt",
        device=device,
        progress=progress,
        metadata={"datasets": names, "images": len(images), "region_scale": settings.get("region_scale")},
        **training,
    )


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return [round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]


def _on_device(sample: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    label, box = sample.get("label"), sample.get("box")
    return {
        "name": str(sample.get("name", "image")),
        "image": plain_tensor(sample["image"]).float().to(device),
        "box": plain_tensor(box).float().reshape(-1).to(device) if box is not None else None,
        "label": plain_tensor(label)[0].float().to(device) if label is not None else None,
    }


def run_explain(
    network: nn.Module,
    samples: Sequence[Mapping[str, Any]],
    flow: VelocityField,
    settings: Mapping[str, Any] | ExplainSettings,
    output_dir: str | os.PathLike,
    reference_network: nn.Module | None = None,
    max_images: int = 4,
    device: torch.device | str = "cpu",
    progress: bool = True,
    inputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Explain up to ``max_images`` samples (spread over ``samples``); write ``explain.json`` and PNG figures.

    Args:
        network: the model explained (e.g. the pruned one).
        samples: preprocessed samples with ``image`` (the model input), ``box`` and ``label``.
        flow: the velocity field whose inversion gives the transport path.
        settings: :class:`~.runner.ExplainSettings` or its keys.
        output_dir: where ``explain.json`` and ``figures/`` go.
        reference_network: the dense model, for the dense-vs-pruned difference.
        max_images: images explained.
        device: where the models run.
        progress: a progress bar over images.
        inputs: what the run was given (checkpoints, flow), copied into the JSON.
    """
    from tqdm.auto import tqdm

    from ..reports.explain import plot_compression, plot_method_maps

    settings = as_settings(settings)
    device = torch.device(device)
    if max_images < 1:
        raise ConfigError(f"max_images must be >= 1, got {max_images}")
    if len(samples) == 0:
        raise DataError("no images to explain: the test split is empty")
    models = [m.to(device).eval().requires_grad_(False) for m in (network, reference_network) if m is not None]
    chosen = [_on_device(samples[i], device) for i in spread_indices(len(samples), max_images)]
    output = Path(output_dir)
    rows, figures = [], []
    for sample in tqdm(chosen, desc="explain", disable=not progress, leave=False):
        explanation = explain_image(
            sample["name"], sample["image"], sample["box"], models[0], flow, settings, sample["label"],
            models[1] if len(models) > 1 else None,
        )  # fmt: skip
        rows.append(explanation)
        figures += _write_figures(explanation, output / "figures", plot_method_maps, plot_compression)
    summary = _write_json(rows, settings, flow, output, inputs)
    summary["figures"] = [str(f) for f in figures]
    return summary


def _write_figures(explanation: ImageExplanation, folder: Path, methods, compare) -> list[Path]:
    box = explanation.box
    stem = explanation.name.replace("/", "_")
    maps = {name: a.spatial() for name, a in explanation.attributions.items()}
    files = [
        methods(explanation.image, box, explanation.mask, maps, explanation.metrics, folder / f"{stem}_methods.png")
    ]
    if explanation.compression is not None:
        files.append(compare(explanation.image, box, explanation.mask, explanation.band, explanation.compression,
                             folder / f"{stem}_compression.png"))  # fmt: skip
    return files


def _write_json(rows, settings: ExplainSettings, flow: VelocityField, output: Path, inputs) -> dict[str, Any]:
    import dataclasses

    content = {
        "settings": dataclasses.asdict(settings),
        "inputs": dict(inputs or {}),
        "flow": {"config": dataclasses.asdict(flow.config), **flow.metadata, **flow.training_record},
        "summary": summarise(rows),
        "images": [r.summary() for r in rows],
    }
    write_json_atomic(output / "explain.json", content)
    return {"explain_json": str(output / "explain.json"), "summary": content["summary"]}


def dense_checkpoint_of(prune_dir: str | os.PathLike) -> str | None:
    """The dense checkpoint a pruning run started from (its ``report.json``), or ``None`` if it does not say."""
    import json

    report = Path(prune_dir) / "report.json"
    if not report.is_file():
        return None
    path = json.loads(report.read_text()).get("inputs", {}).get("medsam_ckpt", {}).get("path")
    return str(path) if path else None
