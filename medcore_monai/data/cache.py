"""Datasets that decode and preprocess each image once, for calibration, recovery and evaluation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose

__all__ = ["CACHE_MODES", "build_dataset", "transform_fingerprint"]

CACHE_MODES = ("memory", "disk", "none")
_SIMPLE_TYPES = (str, int, float, bool, type(None))


def _describe(value: Any) -> Any:
    """JSON-able description of a transform attribute; objects without a stable form become their type."""
    if isinstance(value, _SIMPLE_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    # Generators, locks and the like have no stable repr (it holds memory addresses).
    return type(value).__qualname__


def transform_fingerprint(transforms: Sequence[Any]) -> bytes:
    """Hash of the transforms' classes and simple settings (sizes, keys, thresholds, seeds).

    MONAI's own ``json_hashing`` falls back to class names for transforms that are not JSON
    serialisable, so a disk cache built at ``size=256`` would be reused for ``size=1024``; this
    fingerprint includes the settings.

    Args:
        transforms: The deterministic transforms whose output is cached.

    Returns:
        Hex digest as bytes, the form :class:`monai.data.PersistentDataset` expects.
    """
    description = [
        {"class": f"{type(t).__module__}.{type(t).__qualname__}", "settings": _describe(vars(t))} for t in transforms
    ]
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return digest.encode()


def build_dataset(
    items: Sequence[dict[str, Any]],
    transform: Callable | Sequence[Callable],
    cache: str = "memory",
    cache_dir: str | Path | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Dataset:
    """Wrap items and a preprocessing transform in a caching MONAI dataset.

    Only the transforms up to the first random one are cached (MONAI's rule), so a pipeline ending
    in :class:`medcore_monai.transforms.RandBoxFromMaskd` caches everything but the box jitter.

    Args:
        items: Sample dicts (paths or arrays).
        transform: A transform or a sequence of them (wrapped in a Compose).
        cache: ``"memory"``: :class:`monai.data.CacheDataset`, everything decoded up front;
            ``"disk"``: :class:`monai.data.PersistentDataset`, decoded on first access and reused
            across runs (entries come back with every tensor, ``box`` included, as a
            :class:`monai.data.MetaTensor`); ``"none"``: :class:`monai.data.Dataset`, decoded on
            every access.
        cache_dir: Folder for ``"disk"`` (required there). Its file names include a hash of the
            transform settings, so changing e.g. the model size does not reuse stale entries.
        num_workers: Threads filling the memory cache (0 or 1: the calling thread).
        progress: Show a progress bar while filling the memory cache.

    Returns:
        The dataset.

    Raises:
        ValueError: for an unknown ``cache`` mode or ``"disk"`` without ``cache_dir``.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
    pipeline = transform if isinstance(transform, Compose) else Compose(transform)
    data = list(items)
    if cache == "memory":
        return CacheDataset(data, pipeline, cache_rate=1.0, num_workers=max(1, num_workers), progress=progress)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        return PersistentDataset(
            data, pipeline, cache_dir=cache_dir, hash_transform=transform_fingerprint, track_meta=True
        )
    return Dataset(data, pipeline)
