"""Result files written atomically: :func:`write_json`.

A result JSON (scores, predictions) is written to a temporary file next to its destination and moved over it with
``os.replace``, so a crash or an unserialisable value never leaves a half-written file, and a previous file of
that name stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

__all__ = ["write_json"]


def _temporary_path(path: str) -> str:
    """A fresh name for a hidden temporary file in ``path``'s directory."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_json(path: str, data: Any, indent: int = 2) -> str:
    """Write ``data`` as JSON to ``path`` atomically (parent directories created); return ``path``.

    The text is exactly ``json.dump(data, handle, indent=indent)``'s.  On any error the temporary file is removed
    and whatever was at ``path`` before is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = _temporary_path(os.path.join(directory, os.path.basename(path)))
    try:
        with open(temporary, "x", encoding="utf-8") as handle:  # "x": a new file, with the umask's permissions
            json.dump(data, handle, indent=indent)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path
