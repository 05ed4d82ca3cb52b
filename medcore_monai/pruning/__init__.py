"""pruning of medcore_monai."""
