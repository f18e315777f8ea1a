"""Run the suite's stack-relevant parts inside each legacy stack (see tests/stacks.py)."""

import os
import subprocess

import pytest

from .stacks import ROOT, STACKS, current, ensure

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(bool(current()) or os.environ.get("VR_SKIP_STACKS") == "1", reason="nested run"),
]


@pytest.mark.parametrize("name", sorted(STACKS))
def test_suite_in_stack(name):
    stack = STACKS[name]
    python = ensure(stack)
    env = dict(os.environ, VR_STACK=name, **stack.env)
    env.pop("PYTHONPATH", None)
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *stack.tests]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = (run.stdout + run.stderr)[-6000:]
    print(tail)
    assert run.returncode == 0, f"suite failed in stack {name!r} ({stack.note}):\n{tail}"
