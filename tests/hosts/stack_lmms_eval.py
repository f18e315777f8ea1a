"""lmms-eval 0.7.3 in its own venv: region-tuned and pruned checkpoints through its llava_hf, and ``vr_pruned``."""

from ..stacks import COMMON_TEST_TOOLS, OFFLINE_ENV, Stack

STACK = Stack(
    name="lmms_eval",
    requirements=(
        "torch==2.13.0",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "accelerate==1.15.0",
        "peft==0.21.2",
        "datasets==5.2.0",
        "evaluate==0.4.6",
        # lmms-eval 0.7.3's evaluator patches filelock._api.FileLockMeta, which filelock 4 no longer has
        "filelock>=3.16,<4",
        # lmms_eval/models/simple/llava_hf.py imports decord at the top (video input)
        "decord==0.6.0",
        "sacrebleu==2.6.0",
        "loguru",
        "pytablewriter",
        "tenacity",
        "pydantic",
        "pyyaml",
        "jinja2",
        "numpy",
        "pillow",
        "sentencepiece",
        "protobuf",
        "tqdm",
        *COMMON_TEST_TOOLS,
    ),
    # its pins pull torchvision (no CPU build for torch 2.13 here), wandb, openai, spacy, ...: only what
    # `lmms-eval --model llava_hf` and lmms_eval.models.{simple,chat}.llava_hf really import is installed above
    no_deps=("lmms-eval==0.7.3",),
    tests=("tests/hosts/test_lmms_eval.py",),
    env={
        **OFFLINE_ENV,
        "TOKENIZERS_PARALLELISM": "false",
    },
    revision="1",
    note="lmms-eval 0.7.3 (--no-deps) on transformers 5.24: llava_hf (simple + chat) on the tiny Llava, CPU",
)
