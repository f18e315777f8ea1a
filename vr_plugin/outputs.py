"""Output directories that never clobber a model: :func:`check_output`, :func:`writing`, :func:`check_complete`.

* A non-empty output directory is refused unless the caller says to replace it (``--overwrite_output_dir``) or the
  run resumes from a checkpoint inside it; an output that is one of the inputs is always refused.
* Writing happens under a marker (``.vr_incomplete``) that is removed, and ``vr_complete.json`` written, only when
  everything is in place; :func:`check_complete` (run by ``eval`` / ``score`` / ``prune`` on their ``--model``)
  refuses a directory whose writing never finished.
* Replacing a directory writes a temporary sibling and swaps it into place at the end, so a failed run leaves the
  previous contents as they were and never a half-written model (nor stale shards beside new ones).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
from typing import Iterable, Iterator, Optional

from .io import write_json

__all__ = ["COMPLETE", "INCOMPLETE", "check_complete", "check_output", "check_weight_files", "writing"]

logger = logging.getLogger(__name__)

INCOMPLETE = ".vr_incomplete"
COMPLETE = "vr_complete.json"


def _same(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_output(
    out: str, *, inputs: Iterable[str] = (), overwrite: bool = False, resume: Optional[str] = None
) -> None:
    """Raise ``ValueError`` if writing ``out`` would replace an input or, unasked, a non-empty directory."""
    for source in inputs:
        if source and os.path.exists(source) and _same(out, source):
            raise ValueError(f"the output directory {out!r} is the input model {source!r}: choose another --output")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"the output {out!r} exists and is no directory")
    held = sorted(n for n in os.listdir(out) if n != INCOMPLETE) if os.path.isdir(out) else []
    if not held or overwrite or (resume and _inside(resume, out)):
        return
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise ValueError(
        f"the output directory {out!r} is not empty (it holds {shown}): pass --overwrite_output_dir to replace it, "
        "--resume_from_checkpoint to continue a run in it, or choose a new --output"
    )


def check_complete(path: str) -> None:
    """Raise ``ValueError`` if ``path`` is a directory vr_plugin began writing and never finished."""
    marker = os.path.join(path, INCOMPLETE)
    if os.path.isfile(marker):
        try:
            with open(marker, encoding="utf-8") as handle:
                what = json.load(handle).get("command", "a vr-plugin run")
        except (OSError, ValueError):
            what = "a vr-plugin run"
        raise ValueError(
            f"{path!r} is unfinished: {what} began writing it and never completed (it crashed or was stopped), so its "
            "model may be missing, partial or an older one; rerun or resume that command"
        )


def check_weight_files(path: str) -> None:
    """Raise ``ValueError`` naming the file if a ``*.safetensors`` file in directory ``path`` is corrupt or truncated.

    Only the headers are read (and checked against the file size), so this costs nothing next to loading.
    """
    if not os.path.isdir(path):
        return
    from safetensors import safe_open

    for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
        file = os.path.join(path, name)
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for bad files
            raise ValueError(
                f"weights file {file} is corrupt or truncated ({error}); save, copy or download it again"
            ) from None


def _mark(directory: str, command: str) -> None:
    os.makedirs(directory, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(os.path.join(directory, INCOMPLETE), {"command": command, "started": stamp, "pid": os.getpid()})


def _finish(directory: str, command: str) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(os.path.join(directory, COMPLETE), {"command": command, "completed": stamp})
    os.remove(os.path.join(directory, INCOMPLETE))


def _swap_into_place(tmp: str, out: str) -> None:
    """Replace ``out`` by ``tmp`` with two renames; the old contents are deleted only after the swap."""
    old = f"{out}.vr-old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def writing(out: str, command: str, *, replace: bool = False, main_process: bool = True) -> Iterator[str]:
    """Yield the directory to write ``out``'s contents into, and complete it when the block succeeds.

    A new or empty ``out`` (or one a resumed run continues in) is written in place under the incomplete marker.
    With ``replace`` and a non-empty ``out``, a temporary sibling is written and swapped into place at the end; on
    failure it is removed (unless it holds checkpoints to resume from, which are kept and named) and ``out`` stays
    as it was. Only ``main_process`` touches the file system (the other ranks of a distributed run write in place).
    """
    in_place = not (replace and os.path.isdir(out) and os.listdir(out))
    target = out if in_place else f"{out.rstrip(os.sep)}.vr-tmp-{os.getpid()}"
    existed = os.path.isdir(target)
    if main_process:
        _mark(target, command)
    try:
        yield target
    except BaseException:
        if main_process and in_place and os.listdir(target) == [INCOMPLETE]:  # failed before writing anything
            os.remove(os.path.join(target, INCOMPLETE))
            if not existed:
                os.rmdir(target)
        elif main_process and not in_place:
            kept = [n for n in os.listdir(target) if n.startswith("checkpoint-")] if os.path.isdir(target) else []
            if kept:
                logger.warning("%s failed; %s is left unchanged; checkpoints kept in %s", command, out, target)
            else:
                shutil.rmtree(target, ignore_errors=True)
        raise
    if main_process:
        _finish(target, command)
        if not in_place:
            _swap_into_place(target, out)
