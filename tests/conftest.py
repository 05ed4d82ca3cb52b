"""Shared pytest fixtures: where the real data lives, and small synthetic helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_root() -> Path:
    """Folder holding `kvasir_seg/` and `msd_hippocampus/` (override with MEDCORE_DATA_ROOT)."""
    return Path(os.environ.get("MEDCORE_DATA_ROOT", _DEFAULT_DATA_ROOT))


@pytest.fixture(scope="session")
def kvasir_root() -> Path:
    root = shared_data_root() / "kvasir_seg"
    if not (root / "images").is_dir():
        pytest.skip(f"Kvasir-SEG not found at {root} (set MEDCORE_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def hippocampus_root() -> Path:
    root = shared_data_root() / "msd_hippocampus"
    if not (root / "images").is_dir():
        pytest.skip(f"MSD Hippocampus not found at {root} (set MEDCORE_DATA_ROOT)")
    return root
