"""``python -m vr_plugin``: the ``vr-plugin`` command, also as ``torchrun`` / ``accelerate launch`` start it."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
