"""medcore-monai: boundary-preserving compression of MedSAM-family models, packaged for MONAI."""

__version__ = "0.1.0"
