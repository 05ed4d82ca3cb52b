"""Deployment export of the (compact) SAM image encoder: TorchScript, ONNX and a JSON manifest.

Only the image encoder is exported: it is ~96 % of MedSAM's compute and the part that pruning changes.
Both exporters trace the encoder at its native input size with a dynamic batch dimension, and every
export is verified against eager PyTorch (max absolute difference at most :data:`DEFAULT_ATOL`) on the
example input and on a second random input with a different batch size before the file is installed.

Notes on what works with torch 2.13:

* ``torch.jit.script`` cannot compile segment-anything's ``ImageEncoderViT`` (its blocks use untyped
  Python control flow), so :func:`export_torchscript` traces. Tracing is exact here because the
  encoder's only data-independent branches (window padding, rel-pos resizing) depend on the fixed
  input size.
* ``torch.onnx.export(..., dynamo=False)`` (the legacy TorchScript-based exporter) still works and needs
  only ``onnx``; the dynamo exporter additionally needs ``onnxscript``, so :func:`export_onnx` uses the
  legacy exporter.

Files are written to a temporary file in the target folder, verified, then renamed into place, and an
existing destination is replaced only if it already is an artifact of the same kind, so an input
checkpoint can never be overwritten.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_path
from .build import compact_manifest, current_config, file_sha256
from .structure import count_parameters, encoder_flops

__all__ = [
    "DEFAULT_ATOL",
    "ExportError",
    "export_onnx",
    "export_torchscript",
    "write_export_manifest",
]

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4
MANIFEST_FORMAT = "medcore-export-manifest"
MANIFEST_VERSION = 1
_INPUT_NAME = "images"
_OUTPUT_NAME = "image_embeddings"
_VERIFY_SEED = 1234
_INSTALL_HINT = "pip install 'medcore-monai[export]'"
_PROTOBUF_LIMIT = 2**31

Inputs = torch.Tensor | tuple[torch.Tensor, ...]


class ExportError(RuntimeError):
    """An export failed, could not be verified, or needs a package that is not installed."""


# --------------------------------------------------------------------------- inputs and modules


def _resolve_image_encoder(encoder_or_model: nn.Module) -> nn.Module:
    """The image encoder of a ``Sam`` / :class:`MedSAM`, or the module itself if it is an encoder."""
    encoder = getattr(encoder_or_model, "image_encoder", encoder_or_model)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(encoder_or_model).__name__}")
    if getattr(encoder_or_model, "pixel_normalize", False):
        logger.warning("the exported encoder does not include MedSAM's pixel_normalize step; apply it before")
    return encoder


def _default_example_input(encoder: nn.Module) -> torch.Tensor:
    """A random image batch ``[1, C, S, S]`` in [0, 1] at the encoder's native size."""
    try:
        size = int(encoder.img_size)
        channels = int(encoder.patch_embed.proj.in_channels)
    except AttributeError:
        raise ExportError(
            f"{type(encoder).__name__} is not a SAM ImageEncoderViT; pass example_inputs explicitly"
        ) from None
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, channels, size, size, generator=generator)


def _as_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _second_input(example: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # A different batch size proves that the batch dimension was not frozen into the export.
    generator = torch.Generator().manual_seed(_VERIFY_SEED)
    return tuple(torch.rand((x.shape[0] + 1, *x.shape[1:]), generator=generator, dtype=x.dtype) for x in example)


@contextlib.contextmanager
def _cpu_float32(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode on CPU in float32 (a copy if it lives elsewhere), train mode restored after.

    Exports are made on CPU so that no device is baked into traced tensor constructors.
    """
    on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
    target = module if on_cpu else _cpu_copy(module)
    was_training = target.training
    target.eval()
    try:
        yield target
    finally:
        target.train(was_training)


def _cpu_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to(device="cpu", dtype=torch.float32)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    # Tracer warnings flag Python ints taken from the input size; the size is fixed for a SAM encoder,
    # and the export is verified numerically, so they are noise here. The deprecation notices of
    # torch.jit.trace and of the legacy ONNX exporter are known (see the module docstring).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _max_abs_diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
    if tuple(expected.shape) != tuple(actual.shape):
        raise ExportError(f"exported output shape {tuple(actual.shape)} differs from eager {tuple(expected.shape)}")
    return float((expected.float() - actual.float()).abs().max())


def _verify(
    eager: nn.Module, exported: Callable[..., torch.Tensor], inputs: Sequence[tuple[torch.Tensor, ...]], what: str
) -> list[float]:
    """Compare eager and exported outputs on every input; raise :class:`ExportError` above the tolerance."""
    diffs = []
    with torch.no_grad():
        for args in inputs:
            diff = _max_abs_diff(eager(*args), exported(*args))
            if not diff <= DEFAULT_ATOL:  # also catches NaN
                shapes = [tuple(a.shape) for a in args]
                raise ExportError(
                    f"{what} output differs from eager by {diff:.3g} (> {DEFAULT_ATOL}) on inputs {shapes}"
                )
            diffs.append(diff)
    logger.info("%s verified: max |exported - eager| = %s", what, ", ".join(f"{d:.2e}" for d in diffs))
    return diffs


# --------------------------------------------------------------------------- safe writing


def _is_torchscript_archive(path: Path) -> bool:
    # torch.save archives are zips too; only TorchScript archives carry a code/ folder.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _is_onnx_model(path: Path) -> bool:
    onnx = _require("onnx", "ONNX export")
    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # any parse failure means "not an ONNX model"
        return False
    return True


def _is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _check_destination(path: Path, is_same_kind: Callable[[Path], bool], kind: str) -> None:
    """Refuse to replace anything but a previous artifact of the same kind (e.g. an input checkpoint)."""
    if path.is_dir():
        raise ExportError(f"{path} is a directory")
    if path.exists() and not is_same_kind(path):
        raise ExportError(f"refusing to overwrite {path}: it exists and is not a {kind} (an input checkpoint?)")


# --------------------------------------------------------------------------- TorchScript


def _trace(module: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    try:
        with _quiet_tracing(), torch.no_grad():
            # check_trace re-traces and compares graphs (3x the time); the numeric check below is stricter.
            return torch.jit.trace(module, example, check_trace=False)
    except Exception as err:
        raise ExportError(f"torch.jit.trace failed for {type(module).__name__}: {err}") from err


def export_torchscript(
    encoder_or_model: nn.Module, path: str | os.PathLike, example_inputs: Inputs | None = None
) -> Path:
    """Trace the image encoder, save it as TorchScript and verify the reloaded file against eager.

    Args:
        encoder_or_model: a SAM ``ImageEncoderViT`` (dense, masked by hooks, or slimmed), or a ``Sam`` /
            :class:`MedSAM` whose ``image_encoder`` is exported. Traced on CPU in float32, eval mode.
        path: destination ``.pt`` file; replaced only if it already is a TorchScript archive.
        example_inputs: tracing input(s); default a random ``[1, 3, S, S]`` batch in [0, 1].

    Returns:
        ``path``. Load it with ``torch.jit.load(path)``; the batch dimension is dynamic.

    Raises:
        ExportError: if tracing fails, the output differs from eager by more than :data:`DEFAULT_ATOL`
            (on the example input or a second random input), or ``path`` holds something else.
    """
    path = Path(path)
    _check_destination(path, _is_torchscript_archive, "TorchScript archive")
    encoder = _resolve_image_encoder(encoder_or_model)
    with _cpu_float32(encoder) as module:
        example = _as_tuple(example_inputs if example_inputs is not None else _default_example_input(module))
        traced = _trace(module, example)
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
            reloaded = torch.jit.load(str(tmp), map_location="cpu")
            _verify(module, reloaded, [example, _second_input(example)], "TorchScript")
    return path


# --------------------------------------------------------------------------- ONNX


def _require(module_name: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ExportError(f"{purpose} needs the `{module_name}` package ({_INSTALL_HINT}): {err}") from None


def _check_onnx_size(module: nn.Module) -> None:
    # A single-file ONNX model is one protobuf, limited to 2 GiB; external-data exports are not supported
    # here because they scatter tensors into side files that the atomic rename would not move.
    size = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    if size >= _PROTOBUF_LIMIT:
        raise ExportError(f"encoder weights ({size / 2**30:.2f} GiB) exceed the 2 GiB single-file ONNX limit")


def _onnx_export(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    input_names = [_INPUT_NAME] if len(example) == 1 else [f"{_INPUT_NAME}_{i}" for i in range(len(example))]
    dynamic_axes = {name: {0: "batch"} for name in [*input_names, _OUTPUT_NAME]}
    try:
        with _quiet_tracing(), torch.no_grad():
            torch.onnx.export(
                module,
                example,
                str(path),
                dynamo=False,  # the dynamo exporter needs onnxscript; the legacy one only onnx
                opset_version=opset,
                input_names=input_names,
                output_names=[_OUTPUT_NAME],
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
            )
    except Exception as err:
        raise ExportError(f"ONNX export (legacy exporter, opset {opset}) failed: {err}") from err


def _onnxruntime_runner(path: Path) -> Callable[..., torch.Tensor]:
    ort = _require("onnxruntime", "ONNX verification")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*args: torch.Tensor) -> torch.Tensor:
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(names, args)}
        return torch.from_numpy(session.run(None, feeds)[0])

    return run


def export_onnx(
    encoder: nn.Module, path: str | os.PathLike, opset: int = 17, example_inputs: Inputs | None = None
) -> Path:
    """Export the image encoder to ONNX and verify it with onnxruntime (CPU) against eager.

    Uses the legacy TorchScript-based exporter (``dynamo=False``), which works in torch 2.13 without
    ``onnxscript``. Input ``images`` ``[batch, 3, S, S]``, output ``image_embeddings``
    ``[batch, 256, S/16, S/16]``; the batch dimension is dynamic.

    Args:
        encoder: a SAM ``ImageEncoderViT`` (dense, masked by hooks, or slimmed), or a ``Sam`` /
            :class:`MedSAM` whose ``image_encoder`` is exported.
        path: destination ``.onnx`` file; replaced only if it already is an ONNX model.
        opset: ONNX opset version.
        example_inputs: tracing input(s); default a random ``[1, 3, S, S]`` batch in [0, 1].

    Raises:
        ExportError: if ``onnx`` / ``onnxruntime`` are missing, the exporter fails, the model fails
            ``onnx.checker``, onnxruntime's output differs from eager by more than :data:`DEFAULT_ATOL`, or
            the weights exceed the 2 GiB single-file ONNX limit (ViT-H; ViT-B and smaller are fine).
    """
    onnx = _require("onnx", "ONNX export")
    _require("onnxruntime", "ONNX verification")
    path = Path(path)
    _check_destination(path, _is_onnx_model, "ONNX model")
    with _cpu_float32(_resolve_image_encoder(encoder)) as module:
        _check_onnx_size(module)
        example = _as_tuple(example_inputs if example_inputs is not None else _default_example_input(module))
        with atomic_path(path) as tmp:
            _onnx_export(module, example, tmp, opset)
            try:
                onnx.checker.check_model(str(tmp))
            except onnx.checker.ValidationError as err:
                raise ExportError(f"exported ONNX model is invalid: {err}") from err
            _verify(module, _onnxruntime_runner(tmp), [example, _second_input(example)], "ONNX (onnxruntime)")
    return path


# --------------------------------------------------------------------------- manifest


def _package_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for package in ("medcore-monai", "monai", "segment-anything", "onnx", "onnxruntime"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _file_entry(path: Path, manifest_dir: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"manifest file not found: {path}")
    try:
        shown = path.resolve().relative_to(manifest_dir.resolve()).as_posix()
    except ValueError:  # outside the manifest's folder
        shown = str(path.resolve())
    return {"path": shown, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def _io_spec(model: nn.Module) -> dict[str, Any]:
    config = current_config(model)
    return {
        "input": {"name": _INPUT_NAME, "shape": ["batch", 3, config.img_size, config.img_size], "dtype": "float32"},
        "output": {"name": _OUTPUT_NAME, "shape": ["batch", config.out_chans, config.grid_size, config.grid_size]},
        "pixel_normalize": bool(getattr(model, "pixel_normalize", False)),
    }


def write_export_manifest(
    model: nn.Module,
    path: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write a JSON description of an exported (compact) model, atomically.

    Contents: ``config`` (:meth:`SamConfig.to_dict`), ``blocks`` (per block ``num_heads``, ``mlp_dim``
    and the original indices of the kept heads / MLP channels), ``encoder_params``, ``total_params``,
    ``encoder_flops`` (measured, batch 1, native size), ``io`` (tensor names and shapes), ``files``
    (``path`` relative to the manifest when inside its folder, ``sha256``, ``bytes``), ``versions`` and
    ``extra``.

    Args:
        model: a ``Sam`` or :class:`MedSAM` (anything with ``image_encoder``).
        path: destination ``.json``; replaced only if it already holds JSON.
        extra: JSON-serialisable additions (e.g. pruning budgets, evaluation results).
        files: exported files to list with their SHA-256.
    """
    if not hasattr(model, "image_encoder"):
        raise TypeError(f"expected a Sam or MedSAM model with `image_encoder`, got {type(model).__name__}")
    path = Path(path)
    _check_destination(path, _is_json, "JSON file")
    encoder = model.image_encoder
    content = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "config": current_config(model).to_dict(),
        "blocks": compact_manifest(model),
        "encoder_params": count_parameters(encoder),
        "total_params": count_parameters(model),
        "encoder_flops": encoder_flops(encoder),
        "io": _io_spec(model),
        "files": {Path(f).name: _file_entry(Path(f), path.parent) for f in files},
        "versions": _package_versions(),
        "extra": extra or {},
    }
    text = json.dumps(content, indent=2)  # serialise first: a TypeError must not leave a partial file
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path
