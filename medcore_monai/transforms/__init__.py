"""transforms of medcore_monai."""
