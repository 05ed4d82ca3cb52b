"""Summary statistics for reports: means with percentile bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["mean_interval"]


def mean_interval(values: Sequence[float], n_bootstrap: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """``{"mean", "low", "high", "n"}``: the mean and its percentile bootstrap interval (values resampled).

    With one value the interval is that value; with none every entry but ``n`` is ``None``.
    """
    data = np.asarray([float(v) for v in values], dtype=np.float64)
    if data.size == 0:
        return {"mean": None, "low": None, "high": None, "n": 0}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_bootstrap, data.size))].mean(axis=1)
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return {"mean": float(data.mean()), "low": float(low), "high": float(high), "n": int(data.size)}
