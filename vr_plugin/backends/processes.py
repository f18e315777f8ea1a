"""Which process of a (possibly distributed) run writes files and prints: the main one."""

from __future__ import annotations

import os

__all__ = ["is_main_process"]


def is_main_process() -> bool:
    """Rank 0 of the run: ``torch.distributed``'s rank when it is initialised, else the launcher's ``RANK``.

    Launchers (``torchrun``, ``deepspeed``, ``accelerate launch``) set ``RANK`` before any process group exists;
    under DeepSpeed's CPU accelerator transformers 5's ``TrainingArguments`` report process 0 on every rank, so the
    process group is asked first.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
