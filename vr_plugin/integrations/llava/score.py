"""``python -m vr_plugin.integrations.llava.score --model-path CKPT --data calibration.json --images DIR --out S.json``:
score a LLaVA checkpoint's layers on calibration images, prompts built as LLaVA's eval scripts build them."""

import sys
from types import SimpleNamespace

from vr_plugin.integrations.llava import BUILDER_MODULE
from vr_plugin.integrations.llava_family import score_main


def main(argv: list) -> dict:
    """Parse ``argv`` and score; returns the scores."""
    from llava import constants, conversation, mm_utils

    host = SimpleNamespace(constants=constants, conversation=conversation, mm_utils=mm_utils)
    return score_main(host, BUILDER_MODULE, argv, "vr_plugin.integrations.llava.score", "vicuna_v1")


if __name__ == "__main__":
    main(sys.argv[1:])
