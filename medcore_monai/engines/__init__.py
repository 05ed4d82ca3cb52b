"""Ignite/MONAI engines of medcore_monai: evaluation, recovery, fine-tuning."""
