"""``python -m vr_plugin.integrations.bunny.train`` / ``deepspeed --module vr_plugin.integrations.bunny.train``:
Bunny's own ``train()`` (as ``bunny/train/train.py`` runs it) plus ``--visual_region`` / ``--tune_layers``."""

from vr_plugin.integrations.bunny import train

if __name__ == "__main__":
    train()
