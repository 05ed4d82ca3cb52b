"""handlers of medcore_monai."""
