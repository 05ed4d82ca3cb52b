"""data of medcore_monai."""
