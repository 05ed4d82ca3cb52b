"""robust of medcore_monai."""
