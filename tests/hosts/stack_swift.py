"""The ms-swift stack: ``swift sft`` 4.6.0 on its own transformers / peft / trl pins (tests/hosts/test_swift.py)."""

from ..stacks import COMMON_TEST_TOOLS, OFFLINE_ENV, Stack

STACK = Stack(
    name="swift",
    requirements=(
        "torch==2.13.0",
        "ms-swift==4.6.0",
        "transformers==5.19.0",
        "peft==0.20.0",
        "trl==0.29.1",
        "accelerate==1.15.0",
        "datasets==4.8.4",
        "modelscope==1.40.2",
        "pillow",
        *COMMON_TEST_TOOLS,
    ),
    tests=("tests/hosts/test_swift.py",),
    env={
        **OFFLINE_ENV,
        "USE_HF": "1",
    },
    revision="1",
    note="ms-swift 4.6.0 (transformers 5.19.0, peft 0.20.0, trl 0.29.1): swift sft on the tiny Llava (llava1_5_hf)",
)
