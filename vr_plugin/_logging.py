"""The ``vr_plugin`` logger: INFO to stderr by default, like transformers' own library logger."""

from __future__ import annotations

import logging
import os

_configured = False


def setup_logging() -> logging.Logger:
    """Give the ``vr_plugin`` logger a stderr handler once (level from ``VR_PLUGIN_LOG_LEVEL``, default INFO)."""
    global _configured
    logger = logging.getLogger("vr_plugin")
    if not _configured:
        _configured = True
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("[vr_plugin] %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(os.environ.get("VR_PLUGIN_LOG_LEVEL", "INFO").upper())
        logger.propagate = False
    return logger
