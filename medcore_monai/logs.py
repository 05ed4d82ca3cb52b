"""Honest console logs: no "resuming" line for runs that resume nothing.

MONAI's engines create their Ignite state when they are built, so Ignite announces every fresh run (and every
evaluation) as "Engine run resuming from iteration 0". :class:`FreshRunFilter` drops exactly those lines; a real
resume (iteration > 0) is still announced, and the project logs its own resumes with the checkpoint's path.
"""

from __future__ import annotations

import logging
import re

__all__ = ["FreshRunFilter", "install_log_filters"]

_FRESH = re.compile(r"^Engine run resuming from iteration 0,")


class FreshRunFilter(logging.Filter):
    """Drop Ignite's "resuming from iteration 0" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but those announcing a resume from iteration 0."""
        return not (record.name.startswith("ignite.engine") and _FRESH.match(record.getMessage()))


def install_log_filters() -> None:
    """Add :class:`FreshRunFilter` to the root logger's handlers and to Ignite's engine loggers (once)."""
    targets = [*logging.getLogger().handlers]
    targets += [
        logger
        for name, logger in logging.Logger.manager.loggerDict.items()
        if name.startswith("ignite.engine") and isinstance(logger, logging.Logger)
    ]
    for target in targets:
        if not any(isinstance(f, FreshRunFilter) for f in target.filters):
            target.addFilter(FreshRunFilter())
