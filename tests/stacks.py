"""Legacy software stacks the test suite also runs on, each in its own virtual environment.

``python -m pytest`` (in today's stack) creates ``.venvs/<name>`` on first use, reuses it while its
requirements are unchanged, and runs part of the suite inside it (``tests/test_stacks.py``).  Inside such a
run ``VR_STACK`` names the stack, so stack-only tests (``tests/llava``, ``tests/bunny``) know where they are.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venvs"
# every stack's full resolved set, as last tested (``python -m tests.lock_stacks NAME`` rewrites one): a new release
# on PyPI of something a host tool leaves unpinned cannot change or break a stack between two CI runs
LOCKS = Path(__file__).resolve().parent / "locks"
PIP = "pip==26.3"
PIP_ATTEMPTS = 2  # a download that fails half-way (a busy registry, a dropped connection) is tried once more


@dataclass(frozen=True)
class Stack:
    """A pinned environment: what to install and which tests to run in it."""

    name: str
    requirements: tuple
    no_deps: tuple = ()
    tests: tuple = ()
    note: str = ""
    env: dict = field(default_factory=dict)
    # run after the installs with the venv's site-packages directory (e.g. to write a stub package)
    after_install: Optional[Callable[[Path], None]] = None
    # bump when after_install changes what it writes
    revision: str = ""

    @property
    def path(self) -> Path:
        return VENVS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    @property
    def lock(self) -> Path:
        return LOCKS / f"{self.name}.txt"

    def fingerprint(self) -> str:
        parts = [self.requirements, self.no_deps] + ([self.revision] if self.revision else [])
        if self.lock.is_file():
            parts.append(self.lock.read_text())
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def site_packages(self) -> Path:
        return next((self.path / "lib").glob("python3*/site-packages"))


COMMON_TEST_TOOLS = ("pytest", "hypothesis")
# every host-tool stack runs offline, on CPU, without telemetry
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "WANDB_MODE": "disabled",
}

STACKS = {
    # LLaVA (haotian-liu/LLaVA c121f04 == llava-torch 1.2.2.post1) on its transformers pin.
    "llava": Stack(
        name="llava",
        requirements=(
            "torch==2.13.0",
            "transformers==4.37.2",
            "tokenizers<0.16",
            "sentencepiece",
            "protobuf",
            "peft==0.10.0",
            "accelerate==0.27.2",
            "deepspeed==0.19.8",
            "einops",
            "einops-exts",
            "shortuuid",
            "pillow",
            "numpy<2",
            "bitsandbytes",
            *COMMON_TEST_TOOLS,
        ),
        no_deps=("llava-torch==1.2.2.post1", "timm==1.0.31"),
        tests=(
            "tests/test_locate.py",
            "tests/test_freeze.py",
            "tests/test_callback.py",
            "tests/test_lora.py",
            "tests/llava",
        ),
        note="transformers 4.37.2: HF Llava at language_model.model.layers; LLaVA's own LlavaLlamaForCausalLM",
    ),
    # Bunny (BAAI-DCAI/Bunny 08273ac; not on PyPI: tests put the checkout named by VR_BUNNY_REPO on PYTHONPATH).
    # transformers 4.47.1: Bunny trains on 4.38-4.51 but its vendored models only generate (eval, serve) before
    # 4.48 (they call Cache.get_max_length); 4.47 also has the pre-4.52 HF VLM layout with Qwen2-VL and Idefics3.
    "bunny": Stack(
        name="bunny",
        requirements=(
            "torch==2.13.0",
            "transformers==4.47.1",
            "tokenizers>=0.21,<0.22",
            "sentencepiece",
            "protobuf",
            "peft==0.14.0",
            "accelerate==1.2.1",
            "bitsandbytes",
            "deepspeed==0.19.8",
            "einops",
            "einops-exts",
            "shortuuid",
            "pillow",
            "numpy<2",
            *COMMON_TEST_TOOLS,
        ),
        # Bunny imports these at load time even on the SigLIP path; their dependencies would pull a CUDA torchvision
        no_deps=("torchvision==0.16.2", "timm==1.0.31", "xformers==0.0.35"),
        tests=(
            "tests/test_locate.py",
            "tests/test_freeze.py",
            "tests/test_callback.py",
            "tests/test_lora.py",
            "tests/test_score_prune.py",
            "tests/bunny",
        ),
        note="transformers 4.47.1: HF VLMs in the pre-4.52 layout; Bunny's own Bunny*ForCausalLM at model.layers",
    ),
}


def _host_stacks() -> dict:
    """Host-tool stacks, one file each: ``tests/hosts/stack_<tool>.py`` defines ``STACK``."""
    found = {}
    for path in sorted((Path(__file__).parent / "hosts").glob("stack_*.py")):
        stack = importlib.import_module(f"{__package__}.hosts.{path.stem}").STACK
        found[stack.name] = stack
    return found


STACKS.update(_host_stacks())


def _run(command: list, **kwargs) -> None:
    subprocess.run(command, check=True, **kwargs)


class StackBuildError(RuntimeError):
    """A stack's pip install failed; the message carries pip's own last lines and the free disk."""


def _pip(stack: Stack, args: list) -> None:
    """``pip install ARGS`` into the stack's venv: against its lock, once more, then (with a warning) without it.

    The last try resolves afresh, for a registry that lacks a locked release; the warning shows in pytest's summary.
    """
    command = [str(stack.python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    locks = [["-c", str(stack.lock)]] * PIP_ATTEMPTS + [[]] if stack.lock.is_file() else [[]] * PIP_ATTEMPTS
    log, failed = [], 0
    for constraints in locks:
        run = subprocess.run(command + constraints, capture_output=True, text=True)
        if run.returncode == 0:
            if stack.lock.is_file() and not constraints:
                reason = log[-1] if log else f"exit {failed}"
                warnings.warn(f"stack {stack.name!r}: installed unlocked; {stack.lock}: {reason}", stacklevel=2)
            return
        failed = run.returncode
        log = (run.stdout + run.stderr).strip().splitlines()
        log = [line for line in log if "is ignored: it is neither a file nor a directory" not in line]
    free = shutil.disk_usage(stack.path).free / 2**30
    raise StackBuildError(
        f"stack {stack.name!r}: pip install failed {len(locks)} times (exit {run.returncode}; {free:.1f} GiB free"
        f" on {stack.path}): {' '.join(args)}\n" + "\n".join(log[-40:])
    )


def ensure(stack: Stack) -> Path:
    """Create (or reuse) the stack's virtual environment with vr_plugin from this checkout; return its python."""
    stamp = stack.path / ".vr-stack"
    if stamp.is_file() and stamp.read_text().strip() == stack.fingerprint() and stack.python.exists():
        return stack.python
    VENVS.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", str(stack.path)])
    _pip(stack, [PIP])
    _pip(stack, list(stack.requirements))
    if stack.no_deps:
        _pip(stack, ["--no-deps", *stack.no_deps])
    _pip(stack, ["--no-deps", "-e", str(ROOT)])
    if stack.after_install is not None:
        stack.after_install(stack.site_packages())
    stamp.write_text(stack.fingerprint())
    return stack.python


def lock(stack: Stack) -> Path:
    """Write the stack's built venv's resolved set (pip freeze, less this checkout and torch) as its lock."""
    frozen = subprocess.run(
        [str(stack.python), "-m", "pip", "freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    keep = [line for line in frozen if "==" in line and not line.startswith(("-e", "#", "torch=="))]
    LOCKS.mkdir(exist_ok=True)
    header = f"# {stack.name}: pip freeze of the tested venv (python -m tests.lock_stacks {stack.name})\n"
    stack.lock.write_text(header + "\n".join(keep) + "\n")
    return stack.lock


def current() -> str:
    """The stack this process runs in ('' for today's stack)."""
    return os.environ.get("VR_STACK", "")
