"""Atomic file writing: every output goes to a temporary sibling first and is renamed into place.

A crash or an error therefore never leaves a half-written report, checkpoint or figure, and an
existing file is only replaced by a complete new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "atomic_torch_save", "json_default"]


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it over ``path`` if the block succeeds.

    The file gets the usual permissions (``0o666`` minus the umask) rather than ``mkstemp``'s private ``0o600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes) or ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def json_default(value: Any) -> Any:
    """JSON encoding of numpy/torch scalars and arrays and of paths."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: str | os.PathLike, content: Any, **dumps_kwargs: Any) -> Path:
    """Write ``content`` as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(content, indent=2, default=json_default, **dumps_kwargs))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)
