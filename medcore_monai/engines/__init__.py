"""engines of medcore_monai."""
