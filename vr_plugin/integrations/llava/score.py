"""``python -m vr_plugin.integrations.llava.score --model-path CKPT --data calibration.json --images DIR --out S.json``:
score a LLaVA checkpoint's layers on calibration images, prompts built as LLaVA's eval scripts build them."""

import sys
from types import SimpleNamespace

from vr_plugin.integrations.llava_family import score_main


def _load(ns):
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    name = get_model_name_from_path(ns.model_path)
    tokenizer, model, processor, _ = load_pretrained_model(ns.model_path, ns.model_base, name, device=ns.device)
    return tokenizer, model, processor


def main(argv: list) -> dict:
    """Parse ``argv`` and score; returns the scores."""
    from llava import constants, conversation, mm_utils

    host = SimpleNamespace(constants=constants, conversation=conversation, mm_utils=mm_utils)
    return score_main(host, argv, "vr_plugin.integrations.llava.score", "vicuna_v1", _load)


if __name__ == "__main__":
    main(sys.argv[1:])
