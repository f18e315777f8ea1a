"""``python -m vr_plugin.integrations.bunny.score --model-path CKPT --model-type TYPE --data calibration.json
--images DIR --out S.json``: score a Bunny checkpoint's layers on calibration images, prompts built as Bunny's eval
scripts build them (``--conv-mode``: bunny, phi3, minicpm or llama, as the backbone's --version)."""

import sys
from types import SimpleNamespace

from vr_plugin.integrations.llava_family import score_main


def _load(ns):
    from bunny.model.builder import load_pretrained_model
    from bunny.util.mm_utils import get_model_name_from_path

    name = get_model_name_from_path(ns.model_path)
    tokenizer, model, processor, _ = load_pretrained_model(
        ns.model_path, ns.model_base, name, ns.model_type, device=ns.device
    )
    return tokenizer, model, processor


def _arguments(parser):
    parser.add_argument("--model-type", required=True, help="Bunny's --model_type of the checkpoint")


def main(argv: list) -> dict:
    """Parse ``argv`` and score; returns the scores."""
    from bunny import constants, conversation
    from bunny.util import mm_utils

    host = SimpleNamespace(constants=constants, conversation=conversation, mm_utils=mm_utils)
    return score_main(host, argv, "vr_plugin.integrations.bunny.score", "bunny", _load, _arguments)


if __name__ == "__main__":
    main(sys.argv[1:])
