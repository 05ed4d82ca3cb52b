"""A caching dataset whose deterministic transforms may turn one item into several samples.

A volume item becomes one sample per slice (:class:`medcore_monai.transforms.SplitSlicesd`), a 2-D image stays
one sample. MONAI's ``CacheDataset`` caches the list a volume becomes as one entry; :class:`SampleCacheDataset`
flattens those lists once the cache is filled, so ``len(dataset)`` counts samples, each volume is read and
windowed once, and the random transforms (box jitter) run per sample on access.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.data import CacheDataset

__all__ = ["SampleCacheDataset"]


class SampleCacheDataset(CacheDataset):
    """``CacheDataset`` over items that its deterministic transforms may expand into several samples.

    Args:
        data: items (2-D image/label files, volumes, or already loaded arrays).
        transform: a ``Compose``; everything before its first random transform is cached.
        num_workers: threads filling the cache.
        progress: show a progress bar while filling the cache.
        kwargs: other ``CacheDataset`` arguments (``cache_rate`` must stay 1: every item is expanded).
    """

    def __init__(
        self,
        data: Sequence[Any],
        transform: Callable,
        num_workers: int | None = 1,
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("cache_rate", 1.0) != 1.0 or kwargs.get("runtime_cache", False):
            raise ValueError("SampleCacheDataset expands every item up front: keep cache_rate=1, runtime_cache=False")
        self.items: list[Any] = []
        super().__init__(data, transform, num_workers=num_workers, progress=progress, copy_cache=True, **kwargs)

    def set_data(self, data: Sequence[Any]) -> None:
        """Cache the deterministic part of every item, then flatten expanded items into samples."""
        self.items = list(data)
        super().set_data(self.items)
        samples = [sample for entry in self._cache for sample in (entry if isinstance(entry, list) else [entry])]
        self._cache, self.data, self.cache_num = samples, samples, len(samples)
