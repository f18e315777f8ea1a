"""The ``vr_plugin`` logger: INFO to stderr by default, like transformers' own library logger."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

_configured = False

# Messages other libraries print on import that read like errors but are not. Each is dropped at its source logger;
# the README's "Reliability" section explains them once.
#   bitsandbytes (CPUs with AVX512-BF16): the optional `kernels` package, which would fetch a faster 4-bit CPU
#     kernel from the hub, is not installed; bitsandbytes' own CPU kernel is used instead.
#   DeepSpeed: no GPU was found, so its CPU accelerator is used (what this machine has).
LIBRARY_NOISE = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "DeepSpeed": "Setting accelerator to CPU",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Drop the known import-time warnings of :data:`LIBRARY_NOISE` (idempotent; other messages pass)."""
    for name, prefix in LIBRARY_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


def setup_logging() -> logging.Logger:
    """Give the ``vr_plugin`` logger a stderr handler once (level from ``VR_PLUGIN_LOG_LEVEL``, default INFO)."""
    global _configured
    quiet_library_noise()
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


@contextlib.contextmanager
def log_levels(
    level: int, *, logger: str = "vr_plugin", transformers_level: Optional[int] = None, bars: Optional[bool] = None
) -> Iterator[None]:
    """Set ``logger``'s level (and transformers' verbosity and loading bars, when given) inside the block only.

    The one way vr_plugin quiets or raises log output: ``-q`` / ``-v``, the demo, ``inspect``'s rendering.
    """
    from transformers.utils import logging as hf_logging

    target = logging.getLogger(logger)
    saved = target.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    target.setLevel(level)
    if transformers_level is not None:
        hf_logging.set_verbosity(transformers_level)
    if bars is not None:
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        target.setLevel(saved[0])
        hf_logging.set_verbosity(saved[1])
        (hf_logging.enable_progress_bar if saved[2] else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def quiet_library(keep: Optional[str] = None) -> Iterator[None]:
    """Inside a long job (demo, study, sweep): the library's INFO lines and transformers' loading bars off the
    console; ``keep`` names the job's own logger, which stays at INFO."""
    with log_levels(logging.WARNING, transformers_level=logging.ERROR, bars=False):
        if keep is None:
            yield
        else:
            with log_levels(logging.INFO, logger=keep):
                yield
