"""medcore-monai: boundary-preserving compression of MedSAM-family models, packaged for MONAI."""

__version__ = "0.2.0"
