"""metrics of medcore_monai."""
