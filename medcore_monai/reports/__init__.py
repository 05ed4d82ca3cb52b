"""reports of medcore_monai."""
