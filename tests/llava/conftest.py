"""LLaVA tests run only inside the LLaVA stack (tests/stacks.py); elsewhere they are skipped."""

import json
import os
import subprocess
import sys

import pytest

from ..stacks import current

collect_ignore_glob = [] if current() == "llava" else ["test_*.py"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from .fixtures import llava_workspace

    return llava_workspace(str(tmp_path_factory.mktemp("llava")))


def run_llava(
    args: list, cwd: str, env: dict = None, check: bool = True, input_text: str = None
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the stack's interpreter; on failure show the end of its output."""
    environment = dict(os.environ, **(env or {}))
    command = [sys.executable, *args]
    run = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600, input=input_text
    )
    if check and run.returncode != 0:
        raise AssertionError(f"{' '.join(args[:3])} failed ({run.returncode}):\n{(run.stdout + run.stderr)[-5000:]}")
    return run


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
