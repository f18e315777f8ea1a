"""Run the suite's stack-relevant parts inside each other stack (see tests/stacks.py): LLaVA's and Bunny's pins, and
one virtual environment per host tool (tests/hosts/stack_<tool>.py)."""

import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from . import stacks
from .stacks import ROOT, STACKS, current, ensure

pytestmark = [
    pytest.mark.stack,
    pytest.mark.slow,
    pytest.mark.skipif(bool(current()) or os.environ.get("VR_SKIP_STACKS") == "1", reason="nested run"),
]

# pip spends much of a venv's setup waiting on downloads and disk: a few installs at once use the 2 cores better
# than one after another. Set VR_STACK_BUILDS=1 to build them one by one.
BUILDS = int(os.environ.get("VR_STACK_BUILDS", "3"))


@pytest.fixture(scope="module")
def built(request):
    """Every selected stack's venv, built (or reused) concurrently before the first stack's tests run."""
    names = sorted(
        item.callspec.params["name"]
        for item in request.session.items
        if item.module.__name__ == __name__ and item.originalname == "test_suite_in_stack"
    )
    with ThreadPoolExecutor(max_workers=max(1, BUILDS)) as pool:
        futures = {name: pool.submit(ensure, STACKS[name]) for name in names}
    return {name: future for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(STACKS))
def test_suite_in_stack(name, built):
    stack = STACKS[name]
    python = built[name].result() if name in built else ensure(stack)  # a failed build raises here, for its stack
    env = dict(os.environ, VR_STACK=name, **stack.env)
    env.pop("PYTHONPATH", None)
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *stack.tests]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = (run.stdout + run.stderr)[-6000:]
    print(tail)
    assert run.returncode == 0, f"suite failed in stack {name!r} ({stack.note}):\n{tail}"


def test_every_stack_is_locked():
    """Each stack installs against its recorded lock, which pins whatever the stack's own requirements name."""
    for name, stack in STACKS.items():
        assert stack.lock.is_file(), f"stack {name!r} has no lock: python -m tests.lock_stacks {name}"
        pins = {line.split("==")[0].lower().replace("_", "-") for line in stack.lock.read_text().splitlines()[1:]}
        for requirement in stack.requirements + stack.no_deps:
            project = requirement.split("==")[0].split("<")[0].split(">")[0].lower().replace("_", "-")
            assert project == "torch" or project in pins, f"{name}: {project} missing from {stack.lock}"


def test_failed_install_says_what_pip_said(tmp_path, monkeypatch):
    """A failed stack install raises with pip's own reason and the free disk, not a bare exit status."""
    monkeypatch.setattr(stacks, "VENVS", tmp_path)

    class Here(stacks.Stack):
        python = sys.executable  # this process's own pip, kept offline below

    stack = Here(name="broken", requirements=())
    stack.path.mkdir()
    with pytest.raises(stacks.StackBuildError, match=r"(?s)'broken'.*GiB free.*no-such-project-vr.*No matching"):
        stacks._pip(stack, ["--no-index", "no-such-project-vr"])


def _wheel(folder, name="vr_probe", version="1.0"):
    """A minimal pure-Python wheel, for pip runs that must stay offline."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/RECORD": "",
    }
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_unsatisfiable_lock_falls_back_with_a_warning(tmp_path, monkeypatch):
    """A lock the registry cannot satisfy is tried twice, then the install resolves afresh and says so."""
    monkeypatch.setattr(stacks, "VENVS", tmp_path / "venvs")
    monkeypatch.setattr(stacks, "LOCKS", tmp_path / "locks")

    class Here(stacks.Stack):
        python = sys.executable  # this process's own pip, in --dry-run: nothing is installed

    stack = Here(name="probe", requirements=())
    stack.path.mkdir(parents=True)
    stacks.LOCKS.mkdir()
    stack.lock.write_text("# probe\nvr-probe==9.9\n")
    with pytest.warns(UserWarning, match=r"'probe': installed unlocked; .*probe\.txt"):
        stacks._pip(stack, ["--dry-run", "--no-index", "--no-deps", str(_wheel(tmp_path))])
