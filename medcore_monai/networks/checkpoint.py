"""Reading and writing SAM/MedSAM checkpoints safely and strictly."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_torch_save

__all__ = [
    "CheckpointError",
    "read_checkpoint",
    "read_model_state",
    "extract_state_dict",
    "checkpoint_manifest",
    "strip_module_prefix",
    "load_state_dict_strict",
    "plain_state_dict",
    "atomic_torch_save",
]

_NESTED_KEYS = ("model", "state_dict", "model_state_dict")
_MAX_LISTED_KEYS = 12


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unsafe, or does not match the model."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """Load a checkpoint with ``weights_only=True`` (tensors and plain containers only).

    Raises:
        CheckpointError: if the file is missing or holds pickled Python objects such as a whole model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} contains pickled Python objects (e.g. a whole nn.Module), which are refused because "
            f"unpickling can run arbitrary code. Re-save it as `torch.save(model.state_dict(), path)`. "
            f"Detail: {str(err).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_module_prefix(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix (DistributedDataParallel / DataParallel) from every key that has it.

    Raises:
        CheckpointError: if a key appears both with and without the prefix.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if name in out:
            raise CheckpointError(f"{source}: key {name!r} appears both with and without a 'module.' prefix")
        out[name] = value
    return out


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside any accepted layout.

    Accepts a raw state dict (``sam_vit_b_01ec64.pth``, ``medsam_vit_b.pth``) or a dict holding it
    under ``model`` (this project's format, MONAI's ``CheckpointSaver``, MONAI Label), ``state_dict``
    (this project's format version 1) or ``model_state_dict`` (MedSAM training checkpoints), preferred
    in that order. ``module.`` prefixes left by DistributedDataParallel are removed.

    Raises:
        CheckpointError: if no state dict is found.
    """
    if _is_tensor_mapping(obj):
        state = dict(obj)
    else:
        nested = [k for k in _NESTED_KEYS if isinstance(obj, Mapping) and _is_tensor_mapping(obj.get(k))]
        if not nested:
            keys = sorted(obj)[:_MAX_LISTED_KEYS] if isinstance(obj, Mapping) else type(obj).__name__
            raise CheckpointError(
                f"{source}: no state dict found (expected tensors at top level or under one of "
                f"{list(_NESTED_KEYS)}; found {keys})"
            )
        state = dict(obj[nested[0]])
    return strip_module_prefix(state, source)


def checkpoint_manifest(obj: Any) -> Mapping[str, Any] | None:
    """The ``medcore`` manifest (architecture and per-block widths) of loaded checkpoint content, if any."""
    manifest = obj.get("medcore") if isinstance(obj, Mapping) else None
    return manifest if isinstance(manifest, Mapping) else None


def read_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint file, whatever its layout (see :func:`extract_state_dict`)."""
    return extract_state_dict(read_checkpoint(path), source=str(path))


def format_keys(keys: list[str]) -> str:
    """The first keys of a list, then how many more, for error messages."""
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return shown + (f" ... and {more} more" if more > 0 else "")


def key_problems(given: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected`` (key -> shape)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [
        f"{k}: checkpoint {given[k]} vs model {expected[k]}"
        for k in sorted(set(expected) & set(given))
        if given[k] != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {format_keys(mismatched)}")
    return problems


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Load ``state_dict`` into ``model`` requiring identical keys and shapes.

    Raises:
        CheckpointError: listing missing keys, unexpected keys and shape mismatches in one message.
    """
    problems = key_problems(_shapes(state_dict), _shapes(model.state_dict()))
    if problems:
        where = f" from {source}" if source else ""
        raise CheckpointError(f"state dict{where} does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every parametrized tensor baked in under its plain name.

    A model under ``torch.nn.utils.parametrize`` (e.g. an SVD adaptation being trained) stores
    ``<module>.parametrizations.<name>.original`` and the parametrization's own tensors; checkpoints of
    this project always hold the effective weights under the stock key names instead, so they load into
    an unadapted model.
    """
    from torch.nn.utils import parametrize

    state = model.state_dict()
    for prefix, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        dot = f"{prefix}." if prefix else ""
        for tensor_name in module.parametrizations:
            internal = f"{dot}parametrizations.{tensor_name}."
            for key in [k for k in state if k.startswith(internal)]:
                del state[key]
            state[f"{dot}{tensor_name}"] = getattr(module, tensor_name).detach()
    return state
