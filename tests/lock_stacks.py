"""``python -m tests.lock_stacks NAME [NAME ...]``: record each named stack's built venv as its lock (tests/locks/).

Run it after changing a stack's requirements and seeing its tests pass in the rebuilt venv.
"""

import sys

from .stacks import STACKS, lock

if __name__ == "__main__":
    if len(sys.argv) < 2 or not set(sys.argv[1:]) <= set(STACKS):
        sys.exit(f"usage: python -m tests.lock_stacks NAME [NAME ...] (NAME one of {', '.join(sorted(STACKS))})")
    for name in sys.argv[1:]:
        print(lock(STACKS[name]))
