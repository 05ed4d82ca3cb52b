"""losses of medcore_monai."""
