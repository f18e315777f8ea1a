"""``python -m vr_plugin.integrations.llava.train`` / ``deepspeed --module vr_plugin.integrations.llava.train``:
LLaVA's own ``train()`` (as ``llava/train/train_mem.py`` runs it) plus ``--visual_region`` / ``--tune_layers``."""

from vr_plugin.integrations.llava import train

if __name__ == "__main__":
    train()
