"""The one place that imports segment-anything's modeling classes.

``segment_anything/__init__.py`` imports its predictor utilities, which import torchvision. The modeling
subpackage needs only torch, and torchvision has no CPU build matching recent torch wheels, so when the
package import fails we register an empty parent package (with the right ``__path__``) and import
``segment_anything.modeling`` directly. Nothing else in medcore_monai imports segment_anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from types import ModuleType

__all__ = ["sam_modeling", "sam_image_encoder_module"]


def _register_bare_parent_package() -> None:
    spec = importlib.util.find_spec("segment_anything")
    parent = types.ModuleType("segment_anything")
    parent.__path__ = list(spec.submodule_search_locations)
    parent.__spec__ = spec
    parent.__file__ = spec.origin
    sys.modules["segment_anything"] = parent


def _ensure_parent_package() -> None:
    # Another library's failed `import segment_anything` (MONAI probes it optionally) can leave the
    # modeling submodules in sys.modules without their parent, which breaks pickling and re-imports.
    if sys.modules.get("segment_anything") is not None:
        return
    if importlib.util.find_spec("segment_anything") is None:
        raise ImportError("segment-anything is not installed: pip install segment-anything")
    try:
        importlib.import_module("segment_anything")
    except (ImportError, RuntimeError, OSError):  # torchvision missing, or built for another torch
        sys.modules.pop("segment_anything", None)
        _register_bare_parent_package()


def sam_modeling() -> ModuleType:
    """Return ``segment_anything.modeling``, importing it without torchvision where needed."""
    _ensure_parent_package()
    return importlib.import_module("segment_anything.modeling")


def sam_image_encoder_module() -> ModuleType:
    """Return ``segment_anything.modeling.image_encoder`` (Block, Attention, window helpers)."""
    sam_modeling()
    return importlib.import_module("segment_anything.modeling.image_encoder")
