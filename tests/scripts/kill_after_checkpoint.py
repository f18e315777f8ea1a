"""``python kill_after_checkpoint.py STEP vr-plugin-args...``: run ``vr-plugin`` and SIGKILL it right after the
Trainer has written ``checkpoint-STEP`` (a crash mid-training, as a preempted job sees it)."""

import os
import signal
import sys

import transformers

STEP = int(sys.argv[1])
_save_checkpoint = transformers.Trainer._save_checkpoint


def save_then_die(self, model, trial):
    _save_checkpoint(self, model, trial)
    if self.state.global_step >= STEP:
        os.kill(os.getpid(), signal.SIGKILL)


transformers.Trainer._save_checkpoint = save_then_die

from vr_plugin.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))
