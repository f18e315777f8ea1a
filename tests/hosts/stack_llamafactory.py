"""LLaMA-Factory 0.9.5 in its own venv, on the versions measured to work on this CPU machine (hosts.md).

LLaMA-Factory is installed without its dependencies (its pins would pull a CUDA torch, torchvision and
torchaudio), then the packages it really imports. ``llamafactory/data/mm_plugin.py`` imports torchaudio at top
level and no torchaudio build exists for torch 2.13, so :func:`write_torchaudio_stub` puts a stub package into
site-packages that raises on use (the tests train on images only).
"""

from __future__ import annotations

from pathlib import Path

from ..stacks import COMMON_TEST_TOOLS, OFFLINE_ENV, Stack

TORCHAUDIO_STUB = '''"""Stub written by tests/hosts/stack_llamafactory.py: no torchaudio build exists for this torch.

Importing works (LLaMA-Factory imports torchaudio at top level); using any attribute raises.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise RuntimeError(f"torchaudio.{name}: torchaudio is a stub in this environment (audio is not supported)")
'''


def write_torchaudio_stub(site_packages: Path) -> None:
    """Write the ``torchaudio`` stub package into ``site_packages`` (no dist-info: transformers sees none)."""
    package = Path(site_packages) / "torchaudio"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(TORCHAUDIO_STUB, encoding="utf-8")


STACK = Stack(
    name="llamafactory",
    requirements=(
        "torch==2.13.0",
        "transformers==5.6.0",
        "tokenizers==0.22.2",
        "peft==0.18.1",
        "accelerate==1.11.0",
        "datasets==4.0.0",
        "trl==0.24.0",
        "einops",
        "fire",
        "matplotlib",
        "numpy",
        "omegaconf",
        "packaging",
        "pandas",
        "protobuf",
        "pydantic",
        "pyyaml",
        "safetensors",
        "scipy",
        "sentencepiece",
        "tiktoken",
        "tyro<0.9.0",
        "pillow",
        "tqdm",
        "av<=16.0.0",
        *COMMON_TEST_TOOLS,
    ),
    no_deps=("llamafactory==0.9.5",),
    tests=("tests/hosts/test_llamafactory.py",),
    env={
        **OFFLINE_ENV,
        "DISABLE_VERSION_CHECK": "1",
    },
    after_install=write_torchaudio_stub,
    revision="1",
    note="LLaMA-Factory 0.9.5 on transformers 5.6.0 / peft 0.18.1; torchaudio is a stub",
)
