"""Test-only stand-in for torchvision, put on the MONAI Label server's path by tests/test_label_server.py.

The PyPI torchvision wheels do not import with this project's CPU torch, yet ``monailabel.transform.post`` imports
``torchvision.utils`` at import time. Bundle inference and training never call it. Never ship or install this.
"""
