"""Deployment export of the (compact) SAM image encoder: TorchScript, ONNX and a JSON manifest.

Only the image encoder is exported: it is ~96 % of MedSAM's compute and the part that pruning changes.
Both exporters trace the encoder at its native input size with a dynamic batch dimension, and every
export is verified against eager PyTorch (max absolute difference at most :data:`DEFAULT_ATOL`) on the
example input and on a second random input with a different batch size before the file is installed.

Conversion and the first verification are MONAI's (:func:`monai.networks.utils.convert_to_torchscript`
and :func:`~monai.networks.utils.convert_to_onnx`, both with ``verify=True``). This module adds what they
do not do: the second-batch-size check (MONAI verifies on the tracing inputs only), ``onnx.checker``,
the 2 GiB size check, atomic installation, the overwrite guard, a clear error for missing packages,
CPU float32 copies (MONAI moves the caller's model to the verification device) and keeping the caller's
random state (MONAI's verification reseeds torch, numpy and ``random`` globally).

Notes on what works with torch 2.13:

* ``torch.jit.script`` cannot compile segment-anything's ``ImageEncoderViT`` (its blocks use untyped
  Python control flow), so :func:`export_torchscript` traces (``use_trace=True``). Tracing is exact here
  because the encoder's only data-independent branches (window padding, rel-pos resizing) depend on the
  fixed input size.
* ``torch.onnx.export(..., dynamo=False)`` (the legacy TorchScript-based exporter) still works and needs
  only ``onnx``; the dynamo exporter, torch's default since 2.9, additionally needs ``onnxscript``, so
  :func:`export_onnx` passes ``dynamo=False`` through ``convert_to_onnx``.

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
import random
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.utils import convert_to_onnx, convert_to_torchscript
from torch import nn

from ..files import atomic_path
from .build import compact_manifest, current_config, file_sha256
from .manifest import compact_conv_manifest
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
_CPU = torch.device("cpu")
# rtol=0 keeps the documented criterion: max |exported - eager| <= DEFAULT_ATOL, whatever the magnitude.
_TOLERANCE: dict[str, Any] = {"rtol": 0.0, "atol": DEFAULT_ATOL}

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
        channels = int(getattr(encoder, "in_chans", 0) or encoder.patch_embed.proj.in_channels)
    except AttributeError:
        raise ExportError(
            f"{type(encoder).__name__} is not a SAM or TinyViT image encoder; pass example_inputs explicitly"
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

    Exports are made on CPU so that no device is baked into traced tensor constructors. The copy also keeps
    the caller's model where it is: MONAI's converters call ``model.eval()`` and ``model.to(device)``.
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
    # torch.jit.trace/save/load and of the legacy ONNX exporter are known (see the module docstring).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


@contextlib.contextmanager
def _global_random_state_kept() -> Iterator[None]:
    """Undo the global side effects of MONAI's verification on the caller's run.

    ``convert_to_*(verify=True)`` calls ``set_determinism(0)`` and then ``set_determinism(None)``, which
    reseeds torch (CPU and CUDA), numpy and ``random`` with a fresh random seed and resets the cudnn flags
    to their values when MONAI was imported. An export must not change the course of a seeded workflow.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cudnn_flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags


@contextlib.contextmanager
def _monai_converter(what: str, failure: str) -> Iterator[None]:
    """Run a MONAI converter quietly, keeping the caller's random state, with its errors as ExportError.

    MONAI's verification reports a mismatch as the ``AssertionError`` of ``torch.testing.assert_close``;
    anything else comes from the conversion itself.
    """
    try:
        with _quiet_tracing(), _global_random_state_kept():
            yield
    except AssertionError as err:
        raise ExportError(f"{what} output differs from eager on the example input: {err}") from err
    except Exception as err:
        raise ExportError(f"{failure}: {err}") from err


def _verify_other_batch_size(
    eager: nn.Module, exported: Callable[..., torch.Tensor], example: tuple[torch.Tensor, ...], what: str
) -> None:
    """Compare eager and exported outputs on a random input one larger in batch than ``example``.

    MONAI's converters verify only on the inputs they traced with, which cannot reveal a batch size (or a
    data-dependent branch) frozen into the trace.
    """
    inputs = _second_input(example)
    shapes = [tuple(x.shape) for x in inputs]
    with torch.no_grad(), _quiet_tracing():
        expected = eager(*inputs)
        try:
            actual = exported(*inputs)
        except Exception as err:
            raise ExportError(f"{what} export fails on inputs {shapes} (batch dimension not dynamic?): {err}") from err
    try:
        torch.testing.assert_close(actual, expected, **_TOLERANCE)  # also catches shape mismatches and NaN
    except AssertionError as err:
        raise ExportError(f"{what} output differs from eager on inputs {shapes}: {err}") from err
    logger.info("%s verified against eager on batch sizes %d and %d", what, example[0].shape[0], shapes[0][0])


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


def _convert_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    """Trace ``module`` into ``path`` with MONAI, which reloads the file and verifies it on ``example``."""
    with _monai_converter("TorchScript", f"torch.jit.trace failed for {type(module).__name__}"):
        convert_to_torchscript(
            module,
            str(path),
            verify=True,
            inputs=example,
            device=_CPU,  # MONAI's default is CUDA when available, which would move the model
            use_trace=True,
            check_trace=False,  # re-traces and compares graphs (3x the time); the numeric checks are stricter
            **_TOLERANCE,
        )


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
        with atomic_path(path) as tmp:
            _convert_torchscript(module, example, tmp)
            with _quiet_tracing():
                reloaded = torch.jit.load(str(tmp), map_location="cpu")
            _verify_other_batch_size(module, reloaded, example, "TorchScript")
    return path


# --------------------------------------------------------------------------- ONNX


def _require(module_name: str, purpose: str) -> Any:
    # MONAI's optional_import fails late, inside the converter, without naming this package's extra.
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


def _convert_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    """Export ``module`` to ``path`` with MONAI, which verifies the model with onnxruntime on ``example``."""
    input_names = [_INPUT_NAME] if len(example) == 1 else [f"{_INPUT_NAME}_{i}" for i in range(len(example))]
    with _monai_converter("ONNX (onnxruntime)", f"ONNX export (legacy exporter, opset {opset}) failed"):
        convert_to_onnx(
            module,
            example,
            input_names=input_names,
            output_names=[_OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={name: {0: "batch"} for name in [*input_names, _OUTPUT_NAME]},
            filename=str(path),
            verify=True,
            device=_CPU,
            use_ort=True,
            ort_provider=["CPUExecutionProvider"],
            use_trace=True,
            do_constant_folding=True,
            dynamo=False,  # passed on to torch.onnx.export: the dynamo exporter needs onnxscript
            **_TOLERANCE,
        )


def _check_onnx_model(onnx: Any, path: Path) -> None:
    # MONAI's converter does not run the checker; onnxruntime accepts some models that other runtimes reject.
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported ONNX model is invalid: {err}") from err


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

    Returns:
        ``path``.

    Raises:
        ExportError: if ``onnx`` / ``onnxruntime`` are missing, the exporter fails, the model fails
            ``onnx.checker``, onnxruntime's output differs from eager by more than :data:`DEFAULT_ATOL`
            (on the example input or a second random input), ``path`` holds something else, or the
            weights exceed the 2 GiB single-file ONNX limit (ViT-H; ViT-B and smaller are fine).
    """
    onnx = _require("onnx", "ONNX export")
    _require("onnxruntime", "ONNX verification")
    path = Path(path)
    _check_destination(path, _is_onnx_model, "ONNX model")
    with _cpu_float32(_resolve_image_encoder(encoder)) as module:
        _check_onnx_size(module)
        example = _as_tuple(example_inputs if example_inputs is not None else _default_example_input(module))
        with atomic_path(path) as tmp:
            _convert_onnx(module, example, tmp, opset)
            _check_onnx_model(onnx, tmp)
            _verify_other_batch_size(module, _onnxruntime_runner(tmp), example, "ONNX (onnxruntime)")
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
        "conv_blocks": compact_conv_manifest(model),
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
