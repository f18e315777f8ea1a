"""The axolotl stack: ``axolotl train`` 0.19.0 on its own transformers / peft / trl pins (tests/hosts/test_axolotl.py).

axolotl's wheel pins GPU-only and cloud packages (xformers, liger-kernel, flash-linear-attention, gradio, modal,
lm_eval, s3fs/gcsfs/adlfs/ocifs, mistral-common) and a torch range: it is installed with ``--no-deps`` beside the
packages its training path imports on a CPU machine, all under ``torch==2.13.0``.
"""

from ..stacks import COMMON_TEST_TOOLS, OFFLINE_ENV, Stack

STACK = Stack(
    name="axolotl",
    requirements=(
        "torch==2.13.0",
        "transformers==5.16.1",
        "tokenizers==0.23.1",
        "huggingface_hub==1.17.0",
        "peft==0.20.0",
        "trl==1.9.0",
        "accelerate==1.13.0",
        "datasets==4.8.4",
        "bitsandbytes==0.50.2",
        "torchao==0.17.0",
        "triton==3.9.0",
        "pydantic==2.12.5",
        "packaging==26.0",
        "PyYAML==6.0.3",
        "typer==0.25.1",
        "python-dotenv==1.0.1",
        "evaluate==0.4.1",
        "numba>=0.63.1,<1.0",
        "numpy>=2.1,<3",
        "wandb",
        "addict",
        "fire",
        "einops",
        "colorama",
        "requests",
        "sentencepiece",
        "scipy",
        "art",
        "fastcore",
        "zstandard==0.22.0",
        "schedulefree==1.4.1",
        "posthog==6.7.11",
        "pillow",
        *COMMON_TEST_TOOLS,
    ),
    no_deps=("axolotl==0.19.0", "axolotl-contribs-lgpl==0.0.7", "axolotl-contribs-mit==0.0.6"),
    tests=("tests/hosts/test_axolotl.py",),
    env={
        **OFFLINE_ENV,
        "AXOLOTL_DO_NOT_TRACK": "1",
        "DO_NOT_TRACK": "1",
    },
    revision="1",
    note="axolotl 0.19.0 (transformers 5.16.1, peft 0.20.0, trl 1.9.0): axolotl train with VisualRegionPlugin",
)
